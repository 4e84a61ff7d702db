"""The mocked tools of MiniMind-3's agentic RL (``train_agent.py``), the parsing of ``<tool_call>`` blocks and
its reward for a multi-turn tool-use trajectory.

The six tools (calculator, unit conversion, weather, time, exchange rate, translation) answer from fixed tables,
as MiniMind's do, so a rollout needs nothing outside the process. One difference, on purpose: MiniMind's
calculator runs the model's expression through Python's ``eval``; :func:`calculate` walks the expression's
syntax tree and allows only numbers, arithmetic operators and ``math`` functions / constants, with bounded
powers, so model output never runs as code (its results equal ``eval``'s for every expression it accepts).

:func:`agent_reward` is MiniMind's ``calculate_rewards`` for one trajectory (without a reward model's score,
which can be added to it): -0.5 per unbalanced ``<tool_call>`` tag; with no tool call, length / thinking-format
shaping minus the repetition penalty; with tool calls, +0.5 when the valid calls match the ``gt`` count (else
-0.5 per call of difference), +2.5 x the fraction of ``gt`` values found in the final answer (as a substring or
a number), -0.5 if the turns ran out, minus the repetition penalty; clipped to [-3, 3].
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minimind_jax.rl.rewards import minimind_shaping, repetition_penalty, split_thinking


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _tool("calculate_math", "计算数学表达式", {"expression": {"type": "string"}}, ["expression"]),
    _tool("unit_converter", "单位换算", {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                      "to_unit": {"type": "string"}}, ["value", "from_unit", "to_unit"]),
    _tool("get_current_weather", "获取天气", {"location": {"type": "string"}}, ["location"]),
    _tool("get_current_time", "获取时间", {"timezone": {"type": "string", "default": "Asia/Shanghai"}}, []),
    _tool("get_exchange_rate", "查询汇率", {"from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
          ["from_currency", "to_currency"]),
    _tool("translate_text", "翻译文本", {"text": {"type": "string"}, "target_language": {"type": "string"}},
          ["text", "target_language"]),
]

WEATHER = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
           "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
           "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
           "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}
TIMES = {"Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
         "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
         "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00"}
RATES = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
         ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}
TRANSLATIONS = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
                ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程",
                ("机器学习很有趣", "english"): "Machine learning is interesting", ("Happy birthday", "chinese"): "生日快乐"}
UNITS = {"km_miles": 0.621371, "miles_km": 1.60934, "kg_pounds": 2.20462, "pounds_kg": 0.453592,
         "meters_feet": 3.28084, "feet_meters": 0.3048, "celsius_fahrenheit": 1.8, "fahrenheit_celsius": 0.5556}

# ------------------------------------------------------------------------------------------------ calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MATH = {k: getattr(math, k) for k in ("sqrt", "sin", "cos", "tan", "log", "log2", "log10", "exp", "floor", "ceil",
                                      "fabs", "factorial", "pow", "pi", "e", "tau")}
_MAX_EXPONENT = 1000
_MAX_LENGTH = 512


def _normalise(expression: str) -> str:
    return (expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
            .replace("（", "(").replace("）", ")"))


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math" \
            and node.attr in _MATH:
        return _MATH[node.attr]
    if isinstance(node, ast.Call) and not node.keywords:
        fn = _eval(node.func)
        if not callable(fn):
            raise ValueError("not a function")
        args = [_eval(a) for a in node.args]
        if fn is math.factorial and args and args[0] > _MAX_EXPONENT:
            raise ValueError("factorial too large")
        return fn(*args)
    raise ValueError(f"not allowed in an expression: {type(node).__name__}")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as ``str(eval(expression))`` gives it for what is allowed."""
    text = _normalise(str(expression))
    if len(text) > _MAX_LENGTH:
        raise ValueError("expression too long")
    return str(_eval(ast.parse(text, mode="eval")))


# ------------------------------------------------------------------------------------------------ the tools
MOCK_RESULTS: dict[str, Callable[[Mapping], dict]] = {
    "calculate_math": lambda a: {"result": calculate(a.get("expression", "0"))},
    "unit_converter": lambda a: {"result": round(float(a.get("value", 0)) * UNITS.get(
        f"{a.get('from_unit', '').lower()}_{a.get('to_unit', '').lower()}", 1), 4)},
    "get_current_weather": lambda a: (lambda w: {"city": a.get("location"), "temperature": w[0], "humidity": "65%",
                                                 "condition": w[1]})(WEATHER.get(a.get("location"), ("22°C", "晴"))),
    "get_current_time": lambda a: {"datetime": TIMES.get(a.get("timezone", "Asia/Shanghai"), "2025-03-07 14:30:00"),
                                   "timezone": a.get("timezone", "Asia/Shanghai")},
    "get_exchange_rate": lambda a: {"from": a.get("from_currency"), "to": a.get("to_currency"),
                                    "rate": RATES.get((a.get("from_currency"), a.get("to_currency")), 1.0)},
    "translate_text": lambda a: {"translated_text": TRANSLATIONS.get((a.get("text"), a.get("target_language")),
                                                                     a.get("text", ""))},
}
CHECK_ARGS: dict[str, Callable[[Mapping], Any]] = {
    "calculate_math": lambda a: bool(a.get("expression")),
    "unit_converter": lambda a: a.get("value") is not None and a.get("from_unit") and a.get("to_unit"),
    "get_current_weather": lambda a: bool(a.get("location")),
    "get_current_time": lambda a: True,
    "get_exchange_rate": lambda a: bool(a.get("from_currency")) and bool(a.get("to_currency")),
    "translate_text": lambda a: bool(a.get("text")) and bool(a.get("target_language")),
}


def parse_tool_calls(text: str) -> list[dict]:
    """The JSON objects inside ``<tool_call>...</tool_call>`` blocks (blocks that are not valid JSON objects
    are left out)."""
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
        try:
            call = json.loads(body.strip())
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(call, dict):
            calls.append(call)
    return calls


def call_arguments(call: Mapping) -> dict:
    """A call's arguments as a dict (a JSON string is parsed; anything else that is not a dict is ``{}``)."""
    raw = call.get("arguments", {})
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raw = {}
    return raw if isinstance(raw, dict) else {}


def execute_tool(name: str, arguments: Mapping) -> dict | None:
    """The mocked tool's answer, or None for an unknown tool or arguments it cannot use."""
    fn = MOCK_RESULTS.get(name)
    if fn is None:
        return None
    try:
        return fn(arguments)
    except (ValueError, TypeError, ArithmeticError, SyntaxError, RecursionError, KeyError, AttributeError):
        return None


def tool_message(result: dict | None) -> dict:
    """The tool turn MiniMind templates back after a call (at most 2048 characters)."""
    text = json.dumps(result, ensure_ascii=False) if result else '{"error": "tool not found"}'
    return {"role": "tool", "content": text[:2048]}


# ------------------------------------------------------------------------------------------------ the reward
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def gt_found(text: str, gt: Sequence) -> set:
    """The ``gt`` values that appear in ``text``: as a case-insensitive substring, or as a number."""
    text = str(text)
    numbers = [float(x) for x in _NUMBER_IN_TEXT.findall(text.replace(",", ""))]
    found = set()
    for g in gt:
        s = str(g).strip()
        if s and s.lower() in text.lower():
            found.add(g)
        elif _NUMBER.fullmatch(s.replace(",", "")) and any(abs(float(s.replace(",", "")) - n) < 1e-6 for n in numbers):
            found.add(g)
    return found


def agent_reward(turn_outputs: Sequence[str], tools: Sequence[Mapping] | None, gt: Sequence, *,
                 unfinished: bool = False, model_score: float = 0.0) -> float:
    """MiniMind's reward of one agentic trajectory (see the module docstring); ``turn_outputs`` are the
    model's generated texts, one per turn, the last being the final answer."""
    response = turn_outputs[-1] if turn_outputs else ""
    answers = [split_thinking(t)[1] for t in turn_outputs]
    answer = answers[-1] if answers else response.strip()
    valid_names = {t["function"]["name"] for t in tools} if tools else set()
    calls = [c for a in answers for c in parse_tool_calls(a)]
    reward = -0.5 * sum(abs(a.count("<tool_call>") - a.count("</tool_call>")) for a in answers)
    if not calls:
        reward += minimind_shaping(response, min_length=5) + model_score
        return max(min(reward, 3.0), -3.0)
    valid = 0
    for call in calls:
        name = call.get("name", "")
        check = CHECK_ARGS.get(name)
        valid += int(bool(name in valid_names and check and check(call_arguments(call))))
    gap = abs(valid - len(gt)) + max(0, len(calls) - valid)
    reward += 0.5 if gap == 0 else -0.5 * gap
    final = "" if unfinished else (answer.split("</tool_call>")[-1] if "</tool_call>" in answer else answer)
    if gt:
        reward += 2.5 * len(gt_found(final, gt)) / len(gt)
    if unfinished:
        reward -= 0.5
    reward -= repetition_penalty(final if final else answer)
    return max(min(reward, 3.0), -3.0)
