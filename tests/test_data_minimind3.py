"""MiniMind-3's SFT records (``tools`` / ``tool_calls`` as JSON strings, ``reasoning_content``, tool turns) give the
text, ids and labels of MiniMind's own ``SFTDataset`` (transcribed below, rendered by transformers on MiniMind-3's
tokenizer)."""

import json
import pathlib

import numpy as np
import pytest

from minimind_jax.data import SYSTEM_PROMPTS, DataError, JsonlSource, encode_sft, make_dataset
from minimind_jax.tokenizer import load_tokenizer
from test_data import minimind_generate_labels

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind3_tokenizer"

TOOLS = [{"type": "function", "function": {"name": "calculate_math", "description": "evaluate an expression",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}},
                                                          "required": ["expression"]}}}]
CALL = [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]

TOOL_RECORD = {"conversations": [
    {"role": "system", "content": "# Tools", "tools": json.dumps(TOOLS, ensure_ascii=False)},
    {"role": "user", "content": "256 乘以 37 是多少？"},
    {"role": "assistant", "content": "", "tool_calls": json.dumps(CALL, ensure_ascii=False)},
    {"role": "tool", "content": "9472"},
    {"role": "assistant", "content": "256 × 37 = 9472。"},
]}
REASONING_RECORD = {"conversations": [
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2", "reasoning_content": "one plus one is two"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": ""},
]}
RECORDS = [TOOL_RECORD, REASONING_RECORD]


@pytest.fixture(scope="module")
def hf():
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"no fixture at {FIXTURE}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(FIXTURE))


@pytest.fixture(scope="module")
def ours():
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"no fixture at {FIXTURE}")
    return load_tokenizer(FIXTURE)


# --- MiniMind-3's SFTDataset (dataset/lm_dataset.py), transcribed: create_chat_prompt + generate_labels
def minimind_prompt(hf_tok, conversations):
    messages, tools = [], None
    for message in conversations:
        message = dict(message)
        if message.get("role") == "system" and message.get("tools"):
            tools = json.loads(message["tools"]) if isinstance(message["tools"], str) else message["tools"]
        if message.get("tool_calls") and isinstance(message["tool_calls"], str):
            message["tool_calls"] = json.loads(message["tool_calls"])
        messages.append(message)
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, tools=tools)


def minimind_sample(hf_tok, conversations, max_length):
    bos_id = hf_tok(f"{hf_tok.bos_token}assistant\n", add_special_tokens=False).input_ids
    eos_id = hf_tok(f"{hf_tok.eos_token}\n", add_special_tokens=False).input_ids
    prompt = minimind_prompt(hf_tok, conversations)
    input_ids = hf_tok(prompt).input_ids[:max_length]
    input_ids += [hf_tok.pad_token_id] * (max_length - len(input_ids))
    labels = minimind_generate_labels(input_ids, bos_id, eos_id, max_length)
    return prompt, np.asarray(input_ids), np.asarray(labels)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("max_len", [256, 40])  # 40 cuts the tool conversation inside a reply
@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_sft_equals_minimind(tmp_path, hf, ours, index, max_len):
    path = write_jsonl(tmp_path / "sft.jsonl", [RECORDS[index]])
    record = JsonlSource(path, "sft")[0]  # JSON strings parsed as MiniMind's dataset does
    prompt, ids, labels = minimind_sample(hf, RECORDS[index]["conversations"], max_len)
    out = encode_sft(record, ours, max_len)
    assert ours.decode(out.arrays["input_ids"][out.arrays["input_ids"] != ours.pad_token_id].tolist(),
                       skip_special_tokens=False) == hf.decode(ids[ids != hf.pad_token_id].tolist(),
                                                               skip_special_tokens=False)
    np.testing.assert_array_equal(out.arrays["input_ids"], ids)
    np.testing.assert_array_equal(out.arrays["labels"], labels)
    if index == 0:  # the tool schema and the call reached the template
        assert "calculate_math" in prompt and "<tool_call>" in prompt and '"expression": "256 * 37"' in prompt


def test_string_and_list_fields_render_the_same(tmp_path, ours):
    as_lists = {"conversations": [dict(m) for m in TOOL_RECORD["conversations"]]}
    as_lists["conversations"][0]["tools"] = TOOLS
    as_lists["conversations"][2]["tool_calls"] = CALL
    path = write_jsonl(tmp_path / "sft.jsonl", [TOOL_RECORD, as_lists])
    src = JsonlSource(path, "sft")
    assert src[0] == src[1]
    a, b = (encode_sft(src[i], ours, 128).arrays["input_ids"] for i in range(2))
    np.testing.assert_array_equal(a, b)


def test_no_system_prompt_added_to_tool_conversations(ours):
    # MiniMind's pre_processing_chat returns a conversation with tools unchanged, whatever the draw
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_tools = [{**plain[0], "tools": TOOLS}, plain[1]]
    for messages, expect_prompt in ((with_tools, False), (plain, True)):
        ids = encode_sft({"conversations": messages}, ours, 256, rng=np.random.default_rng(0),
                         add_system_prompt_prob=1.0).arrays["input_ids"]
        text = ours.decode(ids.tolist())
        assert any(p in text for p in SYSTEM_PROMPTS) == expect_prompt


@pytest.mark.parametrize("field,index", [("tools", 0), ("tool_calls", 2)])
def test_tool_string_not_json_names_file_line_and_field(tmp_path, field, index):
    bad = json.loads(json.dumps(TOOL_RECORD))
    bad["conversations"][index][field] = '[{"name": "calculate_math", "arguments": '
    path = write_jsonl(tmp_path / "bad.jsonl", [TOOL_RECORD, bad])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: conversations\[{index}\]\.{field} is a string that is not "
                                        r"valid JSON"):
        JsonlSource(path, "sft")[1]  # when the record is read
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: conversations\[{index}\]\.{field} is a string"):
        JsonlSource(path, "sft", validate="full")  # or at open, when a full check is asked for
    not_a_list = json.loads(json.dumps(TOOL_RECORD))
    not_a_list["conversations"][index][field] = '{"name": "x"}'
    path = write_jsonl(tmp_path / "obj.jsonl", [not_a_list])
    with pytest.raises(DataError, match=rf"obj\.jsonl:1: conversations\[{index}\]\.{field} must be a list"):
        JsonlSource(path, "sft")[0]


def test_tool_records_through_the_pipeline(tmp_path, ours):
    path = write_jsonl(tmp_path / "sft.jsonl", RECORDS * 2)
    pipe = make_dataset("sft", path, ours, 128, 2, shuffle=False)
    batch = next(iter(pipe))
    assert batch["input_ids"].shape == (2, 128)
    np.testing.assert_array_equal(batch["input_ids"][0],
                                  encode_sft(JsonlSource(path, "sft")[0], ours, 128).arrays["input_ids"])


def test_sample_tool_records_equal_minimind(hf, ours):
    # the shipped MiniMind-3-format tool-use file (tools / tool_calls as JSON strings, some reasoning_content)
    path = pathlib.Path(__file__).resolve().parents[1] / "data" / "sample" / "sft_tools.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    src = JsonlSource(path, "sft")
    picked = [i for i, line in enumerate(lines) if "reasoning_content" in line][:2] + [0, 1]
    for i in picked:
        _, ids, labels = minimind_sample(hf, json.loads(lines[i])["conversations"], 400)
        out = encode_sft(src[i], ours, 400)
        np.testing.assert_array_equal(out.arrays["input_ids"], ids)
        np.testing.assert_array_equal(out.arrays["labels"], labels)
