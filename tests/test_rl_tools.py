"""minimind_jax.rl.tools: the mocked tools and the agent reward against a transcription of MiniMind-3's
train_agent.py (calculate_rewards, validate_gt_in_text, parse_tool_calls, CHECK_ARGS)."""

import json
import math
import re

import pytest

from minimind_jax.rl import tools as tl
from minimind_jax.rl.rewards import repetition_penalty


# --- MiniMind's reward for one trajectory (no reward model), transcribed
def mm_parse_tool_calls(text):
    calls = []
    for m in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
        try:
            calls.append(json.loads(m.strip()))
        except Exception:
            pass
    return calls


def mm_validate_gt_in_text(text, gt_list):
    text, text_num = str(text), str(text).replace(",", "")
    nums = [float(x) for x in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])", text_num)]
    return {g for g in gt_list if ((s := str(g).strip()) and s.lower() in text.lower())
            or (re.fullmatch(r"[-+]?\d+(?:\.\d+)?", str(g).strip().replace(",", ""))
                and any(abs(float(str(g).strip().replace(",", "")) - n) < 1e-6 for n in nums))}


def mm_reward(turn_outputs, tools, gt, unfinished):
    response = turn_outputs[-1]
    reward = 0.0
    turn_answers = [t.split("</think>", 1)[-1].strip() if "</think>" in t else t.strip() for t in turn_outputs]
    answer = turn_answers[-1] if turn_answers else response.strip()
    valid_names = {t["function"]["name"] for t in tools} if tools else set()
    tool_calls = []
    for a in turn_answers:
        tool_calls.extend(mm_parse_tool_calls(a))
    reward -= 0.5 * sum(abs(t.count("<tool_call>") - t.count("</tool_call>")) for t in turn_answers)
    if not tool_calls:
        reward += 0.5 if 5 <= len(response.strip()) <= 800 else -0.5
        if "</think>" in response:
            think, answer = response.split("</think>", 1)
            reward += 1.0 if 20 <= len(think.strip()) <= 300 else -0.5
            reward += 0.25 if response.count("</think>") == 1 else -0.25
            answer = answer.strip()
        reward -= repetition_penalty(answer)
        return max(min(reward, 3.0), -3.0)
    valid = 0
    for call in tool_calls:
        name, raw = call.get("name", ""), call.get("arguments", {})
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except Exception:
                raw = {}
        check = tl.CHECK_ARGS.get(name)
        valid += int(bool(name in valid_names and check and check(raw)))
    gap = abs(valid - len(gt)) + max(0, len(tool_calls) - valid)
    reward += 0.5 if gap == 0 else -0.5 * gap
    final = "" if unfinished else (answer.split("</tool_call>")[-1] if "</tool_call>" in answer else answer)
    verified = mm_validate_gt_in_text(final, gt) if gt else set()
    if gt:
        reward += 2.5 * len(verified) / len(gt)
    if unfinished:
        reward -= 0.5
    reward -= repetition_penalty(final if final else answer)
    return max(min(reward, 3.0), -3.0)


CALC = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}\n</tool_call>'
UNIT = '<tool_call>{"name": "unit_converter", "arguments": "{\\"value\\": 5, \\"from_unit\\": \\"km\\", \\"to_unit\\": \\"miles\\"}"}</tool_call>'
TRAJECTORIES = [
    ([CALC, "<think>\n算一下\n</think>\n\n256 × 37 = 9472。"], ["9472"], False),
    ([CALC, "答案是 9,472"], ["9472"], False),
    ([CALC, "I do not know"], ["9472"], False),
    ([CALC + CALC, "9472 and 9472"], ["9472"], False),  # one call too many
    ([UNIT, "5 km is 3.1069 miles"], ["3.1069"], False),
    (['<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>', "hm"], ["1"], False),
    ([CALC, CALC, CALC], ["9472"], True),  # ran out of turns
    (["<tool_call> broken", "whatever the answer is"], ["x"], False),  # unbalanced tag, no valid call
    (["<think>\nI can answer this one directly without any tool\n</think>\n\nParis is the capital."], [], False),
    (["ok"], [], False),
]


@pytest.mark.parametrize("turns,gt,unfinished", TRAJECTORIES)
def test_agent_reward_equals_minimind(turns, gt, unfinished):
    assert tl.agent_reward(turns, tl.TOOLS, gt, unfinished=unfinished) == pytest.approx(
        mm_reward(turns, tl.TOOLS, gt, unfinished), abs=1e-12)


@pytest.mark.parametrize("expression", ["256 * 37", "2^10", "（3 + 4）× 5", "7 ÷ 2", "10 // 3", "-2 ** 2", "17 % 5",
                                        "math.sqrt(16) + math.pi", "1.5e3 - 1", "math.factorial(10)"])
def test_calculator_equals_eval(expression):
    text = (expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")"))
    assert tl.calculate(expression) == str(eval(text, {"__builtins__": {}, "math": math}))


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "(1).__class__", "9 ** 9 ** 9",
                                        "math.factorial(100000)", "open('x')", "[1, 2]", "x + 1", "1 +"])
def test_calculator_refuses_what_is_not_arithmetic(expression):
    assert tl.execute_tool("calculate_math", {"expression": expression}) is None


def test_tools_answer_from_their_tables():
    assert tl.execute_tool("calculate_math", {"expression": "256 * 37"}) == {"result": "9472"}
    assert tl.execute_tool("unit_converter", {"value": 5, "from_unit": "km", "to_unit": "miles"}) == {"result": 3.1069}
    assert tl.execute_tool("get_current_weather", {"location": "北京"})["temperature"] == "28°C"
    assert tl.execute_tool("get_exchange_rate", {"from_currency": "USD", "to_currency": "CNY"})["rate"] == 7.21
    assert tl.execute_tool("translate_text", {"text": "Happy birthday", "target_language": "chinese"}) == {
        "translated_text": "生日快乐"}
    assert tl.execute_tool("nope", {}) is None
    assert tl.tool_message(None) == {"role": "tool", "content": '{"error": "tool not found"}'}
    assert tl.parse_tool_calls(CALC + "<tool_call>[1]</tool_call><tool_call>{bad</tool_call>") == [
        {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]
    assert tl.call_arguments({"arguments": '{"a": 1}'}) == {"a": 1}
    assert tl.call_arguments({"arguments": "[1]"}) == {}
    assert tl.gt_found("it is 1,042.0 or so", ["1042", "x"]) == {"1042"}
