"""The shipped sample data (data/sample/*.jsonl) and default tokenizer (minimind_jax/assets/tokenizer): MiniMind's
jsonl schemas, checkable answers, reproducible generation, tokenizer ids / round trips / determinism, and our chat
template rendering exactly what MiniMind-3's renders."""

import importlib.util
import json
import pathlib
import re

import pytest

from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TOKENIZER = ROOT / "minimind_jax" / "assets" / "tokenizer"
# Same place as conftest.FIXTURES / "minimind3_tokenizer" (conftest can't be imported from a test module)
FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind3_tokenizer"

SFT_FILES = ("sft.jsonl", "reason.jsonl", "lora_identity.jsonl")
ROLES = {"system", "user", "assistant"}
MESSAGE_KEYS = {"role", "content", "reasoning_content"}


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_data():
    return _load_script("make_sample_data")


@pytest.fixture(scope="module")
def trainer():
    return _load_script("train_tokenizer")


def read_jsonl(name):
    lines = (SAMPLE / name).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{name} must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


# ------------------------------------------------------------------------------------------------------------
# Schemas


def check_messages(messages, where):
    """A MiniMind conversation: optional system first, then user / assistant alternating, ending with assistant."""
    assert isinstance(messages, list) and messages, where
    for m in messages:
        assert isinstance(m, dict) and set(m) <= MESSAGE_KEYS and {"role", "content"} <= set(m), (where, m)
        assert m["role"] in ROLES, (where, m)
        assert isinstance(m["content"], str) and m["content"].strip(), (where, m)
        if "reasoning_content" in m:
            assert m["role"] == "assistant" and isinstance(m["reasoning_content"], str), (where, m)
            assert m["reasoning_content"].strip(), (where, m)
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0, where


_ARITH = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)[.。]?$")


def arithmetic_ok(text):
    """True / False for an 'a+b=c' answer, None for anything else."""
    m = _ARITH.match(text)
    if not m:
        return None
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


def test_files_and_sizes():
    for name in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "reason.jsonl", "lora_identity.jsonl"):
        assert (SAMPLE / name).is_file(), name
    total = sum((SAMPLE / n).stat().st_size for n in SAMPLE.iterdir() if n.suffix == ".jsonl")
    assert total < 3_000_000


def test_pretrain_schema():
    records = read_jsonl("pretrain.jsonl")
    assert len(records) >= 1000
    for i, r in enumerate(records):
        assert set(r) == {"text"} and isinstance(r["text"], str) and r["text"].strip(), i
    texts = "\n".join(r["text"] for r in records)
    assert re.search(r"[\u4e00-\u9fff]", texts) and "Beautiful is better than ugly." in texts


@pytest.mark.parametrize("name", SFT_FILES)
def test_sft_schema(name):
    records = read_jsonl(name)
    assert len(records) >= 50
    for i, r in enumerate(records):
        assert set(r) == {"conversations"}, (name, i)
        check_messages(r["conversations"], f"{name}:{i + 1}")


def test_sft_variety_and_answers():
    records = read_jsonl("sft.jsonl")
    convs = [r["conversations"] for r in records]
    assert sum(c[0]["role"] == "system" for c in convs) > 50
    assert sum(len(c) > 3 for c in convs) > 50  # multi-turn
    assert any("reasoning_content" in m for c in convs for m in c)
    checked = [arithmetic_ok(m["content"]) for c in convs for m in c if m["role"] == "assistant"]
    assert checked.count(True) > 300 and False not in checked


def test_dpo_pairs():
    records = read_jsonl("dpo.jsonl")
    assert len(records) >= 100
    n_checked = 0
    for i, r in enumerate(records):
        assert set(r) == {"chosen", "rejected"}, i
        check_messages(r["chosen"], f"dpo chosen {i}")
        check_messages(r["rejected"], f"dpo rejected {i}")
        assert r["chosen"][:-1] == r["rejected"][:-1], i  # the same prompt
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"], i
        good, bad = arithmetic_ok(r["chosen"][-1]["content"]), arithmetic_ok(r["rejected"][-1]["content"])
        if good is not None:
            assert good is True and bad is False, i
            n_checked += 1
    assert n_checked > 50


def test_reason_format():
    think = re.compile(r"^<think>\n(.+)\n</think>\n<answer>\n(.+)\n</answer>$", re.DOTALL)
    for i, r in enumerate(read_jsonl("reason.jsonl")):
        answer = r["conversations"][-1]["content"]
        m = think.match(answer)
        assert m, (i, answer)
        assert "<think>" not in m[1] and "</answer>" not in m[2], i
        assert arithmetic_ok(m[2]) in (None, True), i


def test_identity_set():
    convs = [r["conversations"] for r in read_jsonl("lora_identity.jsonl")]
    assert all(any("MiniMind-JAX" in m["content"] for m in c if m["role"] == "assistant") for c in convs)


# ------------------------------------------------------------------------------------------------------------
# Reproducible generation


def test_generation_reproduces_shipped_files(make_data, tmp_path):
    assert make_data.main(["--out", str(tmp_path)]) == 0
    for name in make_data.FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    assert make_data.main(["--check", "--out", str(SAMPLE)]) == 0
    (tmp_path / "sft.jsonl").write_bytes(b"")
    assert make_data.main(["--check", "--out", str(tmp_path)]) == 1


# ------------------------------------------------------------------------------------------------------------
# The shipped tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def test_shipped_tokenizer_basics(tok, trainer):
    assert tok.vocab_size == 6400
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [0, 1, 2]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert [tok.id_to_token(i) for i in range(len(trainer.ADDED_TOKENS))] == trainer.ADDED_TOKENS
    assert tok.encode("<think>\nx\n</think>")[0] == 25
    assert (TOKENIZER / "tokenizer.json").stat().st_size < 1_000_000


@pytest.mark.parametrize("text", [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces\tand tabs\n\nnewlines  ",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "混合 mixed 中英文 text 12+35=47",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Ünïcödé — “quotes” ½ ∑ 日本語 한국어 русский",
    "<|im_start|>user\nhi<|im_end|>\n",
])
def test_shipped_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_shipped_tokenizer_compresses_sample_text(tok):
    text = "\n".join(r["text"] for r in read_jsonl("pretrain.jsonl")[:500])
    assert len(text) / len(tok.encode(text)) > 2.5


def test_shipped_tokenizer_is_reproducible(trainer, tmp_path):
    """Retraining on the shipped sample data gives the shipped files byte for byte."""
    paths = [str(SAMPLE / n) for n in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "reason.jsonl",
                                       "lora_identity.jsonl")]
    trainer.train_files(paths, str(tmp_path), vocab_size=6400, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER / name).read_bytes(), name


def test_train_tiny_tokenizer(trainer, tmp_path):
    data = tmp_path / "mini.jsonl"
    lines = (SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    lines += (SAMPLE / "dpo.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    lines.append(json.dumps({"text": "plain pretrain text 你好"}, ensure_ascii=False))
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = list(trainer.iter_texts([str(data)], progress=False))
    assert "plain pretrain text 你好" in texts and len(texts) > 400
    for out in ("a", "b"):
        trainer.train_files([str(data)], str(tmp_path / out), vocab_size=320, min_frequency=2, progress=False)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    small = load_tokenizer(tmp_path / "a")
    assert small.vocab_size == 320
    assert [small.id_to_token(i) for i in range(len(trainer.ADDED_TOKENS))] == trainer.ADDED_TOKENS
    decoder = small.added_tokens_decoder
    assert all(decoder[i].special == (i < 21) for i in range(len(trainer.ADDED_TOKENS)))
    for text in ("Hello 你好 😀", "12+35=47"):
        assert small.decode(small.encode(text)) == text
    with pytest.raises(ValueError):
        trainer.train(["x"], vocab_size=100, show_progress=False)


def test_train_tokenizer_without_out_leaves_the_shipped_one(trainer, tmp_path, monkeypatch):
    data = tmp_path / "mini.jsonl"
    data.write_text("\n".join((SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:50]) + "\n",
                    encoding="utf-8")
    shipped = (TOKENIZER / "tokenizer.json").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert trainer.main(["--data", str(data), "--vocab_size", "300", "--quiet"]) == 0
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert (TOKENIZER / "tokenizer.json").stat().st_mtime_ns == shipped


def test_train_tokenizer_shows_one_bar_then_the_merge_phase(trainer, tmp_path, capfd):
    data = tmp_path / "mini.jsonl"
    data.write_text("\n".join((SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:50]) + "\n",
                    encoding="utf-8")
    trainer.train_files([str(data)], str(tmp_path / "tok"), vocab_size=300, progress=True)
    err = capfd.readouterr().err
    assert "reading" in err and "50/50" in err  # our bar, over the lines, ends full
    assert err.rstrip().endswith("learning the merges ...")  # announced once reading is done; nothing after it
    assert "Pre-processing" not in err and "Compute merges" not in err  # the trainer's own bars stay off


# ------------------------------------------------------------------------------------------------------------
# Our chat template against MiniMind-3's


@pytest.fixture(scope="module")
def minimind3():
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"no fixture at {FIXTURE}")
    return load_tokenizer(FIXTURE)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "查询天气 / weather",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
                                                                    "properties": {"a": {"type": "integer"}}}}},
]
U, A, S = "user", "assistant", "system"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


CHATS = {
    "single_turn": ([m(U, "hi"), m(A, "hello")], {}),
    "user_only": ([m(U, "hi")], {}),
    "system_multi_turn": ([m(S, "be brief"), m(U, "1+1?"), m(A, "2"), m(U, "你好"), m(A, "你好！")], {}),
    "late_system": ([m(U, "a"), m(S, "mid"), m(U, "c")], {"add_generation_prompt": True}),
    "gen_default": ([m(U, "q")], {"add_generation_prompt": True}),
    "gen_open_thinking": ([m(S, "s"), m(U, "q")], {"add_generation_prompt": True, "open_thinking": True}),
    "gen_closed_thinking": ([m(U, "q")], {"add_generation_prompt": True, "open_thinking": False}),
    "gen_truthy_not_true": ([m(U, "q")], {"add_generation_prompt": True, "open_thinking": 1}),
    "reasoning_content": ([m(U, "q"), m(A, "ans", reasoning_content="\nstep 1\nstep 2\n\n")], {}),
    "think_in_content": ([m(U, "q"), m(A, "<think>\nr\n</think>\n\n\nans")], {}),
    "leading_newlines": ([m(U, "q"), m(A, "\n\nans")], {}),
    "tools_calls_results": (
        [m(S, "S"), m(U, "weather?"),
         m(A, "", tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
                              {"function": {"name": "add", "arguments": "{\"a\": 1}"}}]),
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "1"}, m(A, "It is sunny.")],
        {"tools": TOOLS, "add_generation_prompt": True}),
    "tools_no_system": (
        [m(U, "weather?"), m(A, "let me check", tool_calls=[{"name": "get_weather", "arguments": {"city": "x"}}]),
         {"role": "tool", "content": "sunny"}, m(U, "ok")], {"tools": TOOLS}),
}


@pytest.mark.parametrize("case", sorted(CHATS))
def test_chat_template_matches_minimind3(tok, minimind3, case):
    messages, kwargs = CHATS[case]
    ours = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == minimind3.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.startswith("<|im_start|>")


def test_chat_template_is_ours(tok, trainer):
    """Our own template text (not a copy of MiniMind-3's), as the trainer writes it."""
    assert tok.chat_template == trainer.CHAT_TEMPLATE
    if (FIXTURE / "tokenizer_config.json").is_file():
        assert tok.chat_template != json.loads((FIXTURE / "tokenizer_config.json").read_text())["chat_template"]
    text = tok.apply_chat_template([m(U, "hi")], add_generation_prompt=True, open_thinking=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
