"""minimind_jax.data: MiniMind's sample rules, the assistant mask, jsonl validation and the grain pipelines."""

import json
import pathlib

import grain
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minimind_jax.data import (
    EMPTY_THINK,
    IGNORE_INDEX,
    SYSTEM_PROMPTS,
    ChatMarkers,
    DataError,
    JsonlSource,
    assistant_labels,
    encode_dpo,
    encode_pretrain,
    encode_sft,
    make_dataset,
)
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "minimind_jax" / "assets" / "tokenizer"
SAMPLE = ROOT / "data" / "sample"
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def covered_text(tok, input_ids, labels):
    """The label-covered tokens, decoded (labels must equal the inputs there)."""
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    mask = labels != IGNORE_INDEX
    assert np.array_equal(labels[mask], input_ids[mask])
    return tok.decode(input_ids[mask].tolist())


def uncovered_text(tok, input_ids, labels, pad_id=0):
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    keep = (labels == IGNORE_INDEX) & (input_ids != pad_id)
    return tok.decode(input_ids[keep].tolist())


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# Pretrain


def test_pretrain_sample(tok):
    text = "Hello world, 你好。"
    tokens = tok.encode(text, add_special_tokens=False)
    out = encode_pretrain({"text": text}, tok, 32)
    ids, labels = out.arrays["input_ids"], out.arrays["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape == (32,)
    n = len(tokens) + 2
    assert ids[:n].tolist() == [tok.bos_token_id, *tokens, tok.eos_token_id]
    assert (ids[n:] == tok.pad_token_id).all()
    assert labels[:n].tolist() == ids[:n].tolist() and (labels[n:] == IGNORE_INDEX).all()
    assert not out.truncated


def test_pretrain_truncation(tok):
    text = "one two three four five six seven eight nine ten " * 5
    tokens = tok.encode(text, add_special_tokens=False)
    out = encode_pretrain({"text": text}, tok, 16)
    assert out.truncated
    assert out.arrays["input_ids"].tolist() == [1, *tokens[:14], 2]
    assert (out.arrays["labels"] != IGNORE_INDEX).all()
    # exactly max_seq_len - 2 tokens fit without truncation
    exact = tok.decode(tokens[:14])
    assert tok.encode(exact, add_special_tokens=False) == tokens[:14]
    assert not encode_pretrain({"text": exact}, tok, 16).truncated


def test_pretrain_pipeline_counts_truncated(tok, tmp_path):
    short, long = "short text", "many words " * 40
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in [short, long, short, long, long, short]])
    pipe = make_dataset("pretrain", path, tok, 24, 2, shuffle=False)
    batches = list(pipe)
    assert len(batches) == len(pipe) == 3
    assert pipe.stats.records == 6 and pipe.stats.truncated == 3 and pipe.stats.transformed == 6
    assert batches[0]["input_ids"].shape == (2, 24)


# --------------------------------------------------------------------------------------------------------------
# SFT masks on hand-built conversations


def test_markers(tok):
    m = ChatMarkers.from_tokenizer(tok)
    assert m.start == tuple(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    assert m.end == (tok.eos_token_id, *tok.encode("\n", add_special_tokens=False))
    assert m.pad_id == 0


CASES = [
    pytest.param(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2=4."}],
        ["<think>\n\n</think>\n\n2+2=4."], id="single-turn"),
    pytest.param(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好！"}],
        ["<think>\n\n</think>\n\nHello!", "<think>\n\n</think>\n\n你好！"], id="system-multi-turn"),
    pytest.param(
        [{"role": "user", "content": "8-3?"},
         {"role": "assistant", "content": "8-3=5.", "reasoning_content": "Subtract 3 from 8.\nThat is 5."}],
        ["<think>\nSubtract 3 from 8.\nThat is 5.\n</think>\n\n8-3=5."], id="reasoning_content"),
    pytest.param(
        [{"role": "user", "content": "Reverse abc."},
         {"role": "assistant", "content": "<think>\nc b a\n</think>\n<answer>\ncba\n</answer>"}],
        ["<think>\nc b a\n</think>\n\n<answer>\ncba\n</answer>"], id="think-in-content"),
    pytest.param(
        [{"role": "system", "content": "Use tools.", "tools": [
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]},
         {"role": "user", "content": "1+2"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
         {"role": "tool", "content": "3"},
         {"role": "assistant", "content": "It is 3."}],
        ['<think>\n\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
         "<think>\n\n</think>\n\nIt is 3."], id="tools"),
]


@pytest.mark.parametrize("messages,replies", CASES)
def test_sft_mask_hand_built(tok, messages, replies):
    out = encode_sft({"conversations": messages}, tok, 512)
    ids, labels = out.arrays["input_ids"], out.arrays["labels"]
    assert ids.shape == labels.shape == (512,) and ids.dtype == labels.dtype == np.int32
    assert not out.truncated
    assert covered_text(tok, ids, labels) == "".join(r + END for r in replies)
    # everything else is the template's non-assistant text, user / system / tool contents included
    uncovered = uncovered_text(tok, ids, labels)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in uncovered
    if messages[0].get("tools"):
        assert "# Tools" in uncovered and '"name": "add"' in uncovered
    # padding is never covered, the text is the template's
    n = int((ids != 0).sum())
    assert (labels[n:] == IGNORE_INDEX).all()
    assert tok.decode(ids[:n].tolist()) == tok.apply_chat_template(messages, tools=messages[0].get("tools"))


def test_sft_truncated_mid_reply(tok):
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three " * 20}]
    full = encode_sft({"conversations": messages}, tok, 512).arrays
    n = int((full["input_ids"] != 0).sum())
    out = encode_sft({"conversations": messages}, tok, n - 10)
    assert out.truncated
    assert out.arrays["input_ids"].tolist() == full["input_ids"][: n - 10].tolist()
    assert out.arrays["labels"].tolist() == full["labels"][: n - 10].tolist()
    assert out.arrays["labels"][-1] != IGNORE_INDEX  # the cut reply is covered to the end


def minimind_generate_labels(input_ids, bos_id, eos_id, max_length):
    """MiniMind's SFTDataset.generate_labels, verbatim in logic."""
    labels = [-100] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i:i + len(bos_id)] == bos_id:
            start = i + len(bos_id)
            end = start
            while end < len(input_ids):
                if input_ids[end:end + len(eos_id)] == eos_id:
                    break
                end += 1
            for j in range(start, min(end + len(eos_id), max_length)):
                labels[j] = input_ids[j]
            i = end + len(eos_id) if end < len(input_ids) else len(input_ids)
        else:
            i += 1
    return labels


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 5, 234, 4162, 1041, 7]), max_size=40))
def test_assistant_labels_match_minimind(ids):
    markers = ChatMarkers((1, 4162, 1041, 234), (2, 234), 0)
    ours = assistant_labels(ids, markers).tolist()
    assert ours == minimind_generate_labels(list(ids), list(markers.start), list(markers.end), len(ids))


# Random text without '<' (so no control token or think tag can appear in the contents)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=24)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(TEXT)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(TEXT)})
    return messages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations())
def test_sft_mask_invariants(tok, messages):
    out = encode_sft({"conversations": messages}, tok, 1024)
    assume(not out.truncated)
    ids, labels = out.arrays["input_ids"], out.arrays["labels"]
    replies = [EMPTY_THINK + m["content"].lstrip("\n") + END for m in messages if m["role"] == "assistant"]
    assert covered_text(tok, ids, labels) == "".join(replies)
    # the rest is exactly the non-assistant text: no user / system text is covered
    rendered = tok.apply_chat_template(messages)
    rest = rendered
    for reply in replies:
        rest = rest.replace("<|im_start|>assistant\n" + reply, "<|im_start|>assistant\n", 1)
    assert uncovered_text(tok, ids, labels) == rest
    assert int((labels == tok.eos_token_id).sum()) == len(replies)


def test_reason_sample_file(tok):
    first = json.loads((SAMPLE / "reason.jsonl").read_text(encoding="utf-8").splitlines()[0])
    out = encode_sft(first, tok, 512)
    reply = first["conversations"][-1]["content"]
    thought, answer = reply.split("</think>")
    expected = "<think>\n" + thought.split("<think>")[-1].strip("\n") + "\n</think>\n\n" + answer.lstrip("\n") + END
    assert covered_text(tok, out.arrays["input_ids"], out.arrays["labels"]) == expected


# --------------------------------------------------------------------------------------------------------------
# Augmentations


def test_augmentations(tok):
    record = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    n_system = n_think = 0
    for i in range(200):
        rng = np.random.default_rng([7, i])
        out = encode_sft(record, tok, 256, rng=rng, add_system_prompt_prob=0.2, drop_empty_think_prob=0.8)
        text = tok.decode(out.arrays["input_ids"][out.arrays["input_ids"] != 0].tolist())
        if text.startswith("<|im_start|>system\n"):
            n_system += 1
            assert any(text.startswith(f"<|im_start|>system\n{p}<|im_end|>\n") for p in SYSTEM_PROMPTS)
        has_think = EMPTY_THINK in text
        n_think += has_think
        reply = (EMPTY_THINK if has_think else "") + "Hello" + END
        assert covered_text(tok, out.arrays["input_ids"], out.arrays["labels"]) == reply
    assert 15 <= n_system <= 70 and 15 <= n_think <= 70
    # probability 1 / 0 and the same rng seed -> the same result
    a = encode_sft(record, tok, 64, rng=np.random.default_rng(1), add_system_prompt_prob=1.0,
                   drop_empty_think_prob=1.0).arrays["input_ids"]
    b = encode_sft(record, tok, 64, rng=np.random.default_rng(1), add_system_prompt_prob=1.0,
                   drop_empty_think_prob=1.0).arrays["input_ids"]
    assert np.array_equal(a, b)
    assert tok.decode(a[a != 0].tolist()).startswith("<|im_start|>system\n")
    assert EMPTY_THINK not in tok.decode(a.tolist())


# --------------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_pair(tok):
    record = {"chosen": [{"role": "user", "content": "7*2?"}, {"role": "assistant", "content": "14."}],
              "rejected": [{"role": "user", "content": "7*2?"}, {"role": "assistant", "content": "12."}]}
    out = encode_dpo(record, tok, 64)
    a = out.arrays
    assert set(a) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert all(v.shape == (64,) and v.dtype == np.int32 for v in a.values())
    assert covered_text(tok, a["chosen_input_ids"], a["chosen_labels"]) == EMPTY_THINK + "14." + END
    assert covered_text(tok, a["rejected_input_ids"], a["rejected_labels"]) == EMPTY_THINK + "12." + END
    assert uncovered_text(tok, a["chosen_input_ids"], a["chosen_labels"]) == \
        uncovered_text(tok, a["rejected_input_ids"], a["rejected_labels"])
    # one shared augmentation draw: both sides drop (or keep) the empty think block together
    for i in range(20):
        aug = encode_dpo(record, tok, 64, rng=np.random.default_rng(i), drop_empty_think_prob=0.5).arrays
        kept = [EMPTY_THINK in tok.decode(aug[f"{s}_input_ids"].tolist()) for s in ("chosen", "rejected")]
        assert kept[0] == kept[1]


def test_dpo_pipeline_sample_file(tok):
    pipe = make_dataset("dpo", SAMPLE / "dpo.jsonl", tok, 128, 4, seed=0)
    batch = next(iter(pipe))
    assert batch["chosen_input_ids"].shape == (4, 128) and batch["rejected_labels"].dtype == np.int32
    assert len(pipe) == 300 // 4


# --------------------------------------------------------------------------------------------------------------
# Pipelines: shuffling, sharding, epochs, checkpointing


@pytest.fixture()
def numbered(tmp_path):
    """30 pretrain lines whose first token after bos identifies them."""
    return write_jsonl(tmp_path / "n.jsonl", [{"text": f"{i}"} for i in range(30)])


def record_ids(tok, batches):
    return [tok.decode(row[1:][row[1:] != 0][:-1].tolist()) for b in batches for row in b["input_ids"]]


def test_shuffle_deterministic(tok, numbered):
    def order(seed, shuffle=True):
        return record_ids(tok, make_dataset("pretrain", numbered, tok, 8, 3, seed=seed, shuffle=shuffle))

    assert order(None, shuffle=False) == [str(i) for i in range(30)]
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(None, shuffle=False))


def test_epochs_reshuffle(tok, numbered):
    ids = record_ids(tok, make_dataset("pretrain", numbered, tok, 8, 5, seed=3, epochs=2))
    first, second = ids[:30], ids[30:]
    assert sorted(first) == sorted(second) == sorted(str(i) for i in range(30))
    assert first != second


def test_sharding_disjoint_and_covering(tok, numbered):
    shards = [record_ids(tok, make_dataset("pretrain", numbered, tok, 8, 1, seed=5, shard_index=i, shard_count=4))
              for i in range(4)]
    seen = [x for s in shards for x in s]
    assert len(seen) == len(set(seen)) == 30
    assert sorted(seen) == sorted(str(i) for i in range(30))
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset("pretrain", numbered, tok, 8, 1, shard_index=4, shard_count=4)


@pytest.mark.parametrize("stage,file,kwargs", [
    ("pretrain", "pretrain.jsonl", {}),
    ("sft", "sft.jsonl", {"add_system_prompt_prob": 0.2, "drop_empty_think_prob": 0.8}),
])
def test_checkpoint_restore(tok, stage, file, kwargs):
    def pipe():
        return make_dataset(stage, SAMPLE / file, tok, 64, 16, seed=11, epochs=2, **kwargs)

    full = [b["input_ids"] for b in pipe()]
    it = pipe().iterator()
    k = len(full) // 2 - 3  # the restored run crosses the epoch boundary
    for _ in range(k):
        next(it)
    state = it.get_state()
    json.dumps(state)  # a small JSON-able dict, storable next to a model checkpoint
    expected = [next(it) for _ in range(6)]
    restored = pipe().iterator(state)
    for want in expected:
        got = next(restored)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(want["input_ids"], full[k + i])


def test_augmentation_independent_of_threads(tok):
    kwargs = dict(seed=2, add_system_prompt_prob=0.5, drop_empty_think_prob=0.5)
    a = [b["input_ids"] for b in make_dataset("sft", SAMPLE / "sft.jsonl", tok, 64, 32, **kwargs)]
    b = [b["input_ids"] for b in make_dataset("sft", SAMPLE / "sft.jsonl", tok, 64, 32,
                                              read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=1),
                                              **kwargs)]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------------
# Bad input


GOOD_SFT = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
BAD_SFT = [
    ('{"conversations": [', "malformed JSON"),
    ({"messages": []}, "missing the field 'conversations'"),
    ({"conversations": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": []}, "empty conversation"),
    ({"conversations": [{"role": "user"}]}, "missing the field 'content'"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("bad,message", BAD_SFT)
def test_bad_line_errors(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_SFT, GOOD_SFT, bad, GOOD_SFT])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}") as info:
        JsonlSource(path, "sft", validate="full")
    assert str(path) in str(info.value)
    lazy = JsonlSource(path, "sft")  # opening does not parse; reading the bad record names its line
    assert len(lazy) == 4 and lazy[3] == GOOD_SFT
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}.*prepare_data\.py --check"):
        lazy[2]


def test_bad_fields_other_stages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"txt": "no"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing the field 'text'"):
        JsonlSource(path, "pretrain", validate="full")
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": GOOD_SFT["conversations"]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing the field 'rejected'"):
        JsonlSource(path, "dpo")[0]


def test_skip_bad_lines_counts(tok, tmp_path):
    lines = [GOOD_SFT] + [b for b, _ in BAD_SFT] + ["", GOOD_SFT, GOOD_SFT, GOOD_SFT]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    pipe = make_dataset("sft", path, tok, 32, 2, shuffle=False, skip_bad_lines=True)
    stats = pipe.stats
    assert stats.records == 4 and stats.bad_lines == len(BAD_SFT) and stats.blank_lines == 1
    assert stats.lines == len(lines)
    assert len(stats.bad) == len(BAD_SFT) and stats.bad[0].startswith(f"{path}:2: ")
    assert len(list(pipe)) == 2
    # records keep their file:line
    assert pipe.source.location(1) == f"{path}:{len(lines) - 2}"


def test_sample_files_are_valid():
    for name, stage in [("pretrain", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("reason", "reason"),
                        ("lora_identity", "sft")]:
        source = JsonlSource(SAMPLE / f"{name}.jsonl", stage)
        assert source.stats.bad_lines == 0 and len(source) == source.stats.lines


def test_endless_and_argument_checks(tok, numbered):
    it = make_dataset("pretrain", numbered, tok, 8, 7, seed=1, epochs=None).iterator()
    ids = record_ids(tok, [next(it) for _ in range(9)])  # 63 records: past two epochs
    assert sorted(ids[:30]) == sorted(ids[30:60]) == sorted(str(i) for i in range(30))
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_dataset("pretrain", numbered, tok, 8, 31)
    with pytest.raises(ValueError, match="unknown data stage"):
        make_dataset("rlhf", numbered, tok, 8, 1)
    with pytest.raises(ValueError, match="pretrain"):
        make_dataset("pretrain", numbered, tok, 8, 1, drop_empty_think_prob=0.5)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_dataset("pretrain", numbered.parent / "missing.jsonl", tok, 8, 1)


def test_utf8_bom_on_line_one_and_directory_as_path(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    src = JsonlSource(path, "pretrain")
    assert [src[0]["text"], src[1]["text"]] == ["first", "second"] and src.location(0).endswith("bom.jsonl:1")
    with pytest.raises(DataError, match=r"is a directory"):
        JsonlSource(tmp_path, "pretrain")


def test_lone_surrogate_and_deep_nesting_name_the_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "ok \\u00e9"}\n{"text": "\\ud800"}\n' + "[" * 100000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"odd\.jsonl:2: a string holds a lone UTF-16 surrogate"):
        JsonlSource(path, "pretrain", validate="full")
    src = JsonlSource(path, "pretrain", skip_bad_lines=True)
    assert len(src) == 1 and src[0]["text"] == "ok é" and src.stats.bad_lines == 2
    assert "odd.jsonl:3: JSON nested too deeply" in src.stats.bad[1]
