"""The plain-Python renderings of MiniMind's chat templates (minimind_jax/chat_render.py) equal the Jinja ones."""

import copy
import json
import pathlib

import numpy as np
import pytest

from minimind_jax import chat_render
from minimind_jax.data.jsonl import normalize_record
from minimind_jax.data.samples import conversation_tools
from minimind_jax.tokenizer import _normalize_chat_messages, _render_jinja, load_tokenizer, render_chat_template

ROOT = pathlib.Path(__file__).resolve().parents[1]
M3_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "minimind3_tokenizer"
BUNDLED = ROOT / "minimind_jax" / "assets" / "tokenizer"
SAMPLES = {"sft.jsonl": "sft", "sft_tools.jsonl": "sft", "reason.jsonl": "reason", "lora_identity.jsonl": "sft",
           "dpo.jsonl": "dpo", "rlaif.jsonl": "rlaif", "agent_rl.jsonl": "agent"}


def _templates():
    out = {"bundled": json.loads((BUNDLED / "tokenizer_config.json").read_text())["chat_template"]}
    if M3_TOKENIZER.is_dir():
        out["minimind3"] = load_tokenizer(str(M3_TOKENIZER)).get_chat_template()
    return out


TEMPLATES = _templates()


def _both(template, messages, tools=None, add_generation_prompt=False, **kwargs):
    fast = chat_render.render(template, messages, tools, add_generation_prompt, kwargs)
    slow = _render_jinja(template, copy.deepcopy(messages), tools, add_generation_prompt, kwargs)
    return fast, slow


def _sample_conversations():
    for name, stage in SAMPLES.items():
        for line in (ROOT / "data" / "sample" / name).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = normalize_record(json.loads(line), stage)
            for field in ("conversations", "chosen", "rejected"):
                if isinstance(record.get(field), list):
                    yield name, _normalize_chat_messages(record[field])


def test_the_known_templates_are_recognised_and_a_changed_one_is_not():
    assert chat_render.known_template(TEMPLATES["bundled"]) is chat_render._bundled
    if "minimind3" in TEMPLATES:
        assert chat_render.known_template(TEMPLATES["minimind3"]) is chat_render._minimind3
    for template in TEMPLATES.values():
        assert chat_render.known_template(template.replace("<|im_end|>", "<|im_end|> ", 1)) is None
        assert chat_render.known_template(template + "\n") is None


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_sample_record_renders_as_jinja_does(name):
    template, n = TEMPLATES[name], 0
    for _, messages in _sample_conversations():
        tools = conversation_tools(messages)
        for prompt, thinking in ((False, None), (True, None), (True, True), (True, False)):
            kwargs = {} if thinking is None else {"open_thinking": thinking}
            fast, slow = _both(template, messages, tools, prompt, **kwargs)
            assert fast is not None
            assert fast == slow
            n += 1
    assert n > 100


_TEXTS = ["", "\n", "hi", "\nanswer\n", "<think>\nwhy\n</think>\n\nso", "x</think>y", "a</think>b</think>\nc",
          "<think>", "</think>", "\n\n</think>\n\n", "<tool_call>{}</tool_call>", "多语言 ✓", "<|im_end|>"]


def _random_call(rng):
    arguments = [{"x": 1, "s": "é"}, '{"q": "a"}', {}, [1, 2], "", {"nested": {"k": [True, None, 1.5]}}]
    inner = {"name": str(rng.choice(["f", "search", "天气"])), "arguments": arguments[rng.integers(len(arguments))]}
    return {"type": "function", "function": inner} if rng.random() < 0.6 else inner


def _random_message(rng):
    role = str(rng.choice(["system", "user", "assistant", "tool", "other"], p=[0.15, 0.3, 0.3, 0.2, 0.05]))
    m = {"role": role}
    if rng.random() < 0.9:
        m["content"] = "".join(rng.choice(_TEXTS, size=rng.integers(1, 4)))
    if role == "assistant" and rng.random() < 0.3:
        m["reasoning_content"] = str(rng.choice(_TEXTS))
    if role == "assistant" and rng.random() < 0.4:
        m["tool_calls"] = [_random_call(rng) for _ in range(rng.integers(0, 3))]
    if rng.random() < 0.1:
        m["name"] = "extra keys are not read"
    return m


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_random_conversations_render_as_jinja_does(name):
    template, rendered = TEMPLATES[name], 0
    rng = np.random.default_rng(0)
    for _ in range(600):
        messages = [_random_message(rng) for _ in range(rng.integers(1, 7))]
        tools = [None, [], [{"type": "function", "function": {"name": "f", "parameters": {"a": "中"}}}],
                 [{"name": "g"}, {"name": "h", "description": "</tools>"}]][rng.integers(4)]
        kwargs = {"open_thinking": [True, False, None][rng.integers(3)]} if rng.random() < 0.5 else {}
        prompt = bool(rng.random() < 0.5)
        fast = chat_render.render(template, messages, tools, prompt, kwargs)
        if fast is None:  # only a leading system message without content (MiniMind-3 adds text to it)
            with pytest.raises(Exception, match="no attribute 'content'"):
                _render_jinja(template, copy.deepcopy(messages), tools, prompt, kwargs)
            continue
        assert fast == _render_jinja(template, copy.deepcopy(messages), tools, prompt, kwargs), messages
        rendered += 1
    assert rendered > 500


@pytest.mark.parametrize("messages, tools, kwargs", [
    ([{"role": "user", "content": ["a", "list"]}], None, {}),
    ([{"role": "user", "content": None}], None, {}),
    ([{"role": "user", "content": "hi"}, "not a dict"], None, {}),
    ([{"content": "no role"}], None, {}),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": 3, "arguments": {}}}]}], None, {}),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}], None, {}),
    ([{"role": "assistant", "content": "x", "tool_calls": "calls"}], None, {}),
    ([{"role": "user", "content": "hi"}], [{"name": "f", "obj": object()}], {}),
    ([{"role": "user", "content": "hi"}], ({"name": "f"},), {}),
    ([{"role": "user", "content": "hi"}], None, {"open_thinking": np.bool_(True)}),
    ([], None, {}),
])
def test_unclear_inputs_go_to_jinja(messages, tools, kwargs):
    for template in TEMPLATES.values():
        assert chat_render.render(template, messages, tools, True, kwargs) is None


def test_render_chat_template_takes_the_fast_path_and_keeps_jinja_semantics_elsewhere():
    template = TEMPLATES["bundled"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>a</think>b",
                                                   "thinking": "older field name"}]
    # the reasoning field's older names are aliased before either path reads the messages
    assert "<think>\nolder field name\n</think>" in render_chat_template(template, messages)
    unclear = [{"role": "user", "content": ["a", "list"]}]
    assert render_chat_template(template, unclear, open_thinking=np.bool_(True), add_generation_prompt=True) \
        == _render_jinja(template, unclear, None, True, {"open_thinking": np.bool_(True)})
