"""Pre-tokenised chat stages (minimind_jax/data/prepared_chat.py): the prepared path gives bitwise the jsonl path's
batches for the same records, seed and augmentation draws; bad input, resuming and stage checks."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from minimind_jax.data import DataError, make_dataset
from minimind_jax.data.prepared_chat import PreparedChatSource, open_prepared, prepare_chat
from minimind_jax.data.rl_prompts import RLPromptSource
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
M3_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "minimind3_tokenizer"
TOKENIZER_DIR = ROOT / "minimind_jax" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(M3_TOKENIZER if (M3_TOKENIZER / "tokenizer.json").is_file() else TOKENIZER_DIR)


def _prepare(stage, files, out, tok, **kwargs):
    kwargs = {"workers": 0, "chunk_lines": 64, "progress": False, **kwargs}
    return prepare_chat(stage, [str(f) for f in files], out, tok, **kwargs)


def _assert_same_batches(stage, files, directory, tok, seq, batch, **kwargs):
    raw = make_dataset(stage, [str(f) for f in files], tok, seq, batch, seed=3, epochs=2, **kwargs)
    prep = make_dataset(stage, [str(directory)], tok, seq, batch, seed=3, epochs=2, **kwargs)
    assert isinstance(prep.source, PreparedChatSource) and len(raw) == len(prep) > 0
    n = 0
    for a, b in zip(raw, prep, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {n} {key}")
        n += 1
    assert n == len(raw)
    return raw, prep


# the sample files hold MiniMind-3 records: tools / tool_calls as JSON strings, reasoning_content, tool turns
CASES = {
    "sft": ("sft", ["sft.jsonl", "sft_tools.jsonl"], 160,
            {"add_system_prompt_prob": 0.5, "drop_empty_think_prob": 0.5}),
    "sft-plain": ("sft", ["sft_tools.jsonl"], 1024, {}),
    "reason": ("reason", ["reason.jsonl"], 128, {"drop_empty_think_prob": 0.8, "special_token_weight": 5.0}),
    "dpo": ("dpo", ["dpo.jsonl"], 96, {"drop_empty_think_prob": 0.5}),
    "rlaif": ("rlaif", ["rlaif.jsonl"], 48, {"add_system_prompt_prob": 0.5, "thinking_ratio": 0.5}),
    "agent": ("agent", ["agent_rl.jsonl"], 256, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_prepared_batches_equal_jsonl(case, tok, tmp_path):
    stage, names, seq, kwargs = CASES[case]
    files = [SAMPLE / n for n in names]
    prep_stage = {"reason": "sft"}.get(stage, stage)
    meta = _prepare(prep_stage, files, tmp_path / "p", tok)
    assert meta["stage"] == prep_stage and meta["chat"]["system_ids"] is not None
    raw, prep = _assert_same_batches(stage, files, tmp_path / "p", tok, seq, 16, **kwargs)
    assert prep.stats.records == raw.stats.records
    if case == "sft":  # the draws were exercised: some samples truncated, some not
        assert 0 < raw.stats.truncated < raw.stats.transformed
    if stage in ("rlaif", "agent"):  # the rewards' records read back by record_index
        prompts = RLPromptSource([str(f) for f in files], stage)
        view = prep.source.prompts()
        assert len(view) == len(prompts) and view.kind == stage
        for i in (0, 7, len(prompts) - 1):
            want, got = prompts[i], view[i]
            assert (got.messages, got.tools, got.gt, got.kind) == (want.messages, want.tools, want.gt, want.kind)


def test_augmentations_change_the_ids(tok, tmp_path):
    """Both forms are really used: with p=1 every eligible record gets a system block and loses its empty think
    blocks, with p=0 none (so the equality above is not between two unaugmented paths)."""
    files = [SAMPLE / "sft.jsonl"]
    _prepare("sft", files, tmp_path / "p", tok)
    source = PreparedChatSource(tmp_path / "p")
    flags = source.flags
    assert 0 < np.count_nonzero(flags & 1) and 0 < np.count_nonzero(flags & 2) < len(flags) + 1
    on = make_dataset("sft", [str(tmp_path / "p")], tok, 256, 8, add_system_prompt_prob=1.0,
                      drop_empty_think_prob=1.0, shuffle=False)
    off = make_dataset("sft", [str(tmp_path / "p")], tok, 256, 8, shuffle=False)
    a, b = next(iter(on))["input_ids"], next(iter(off))["input_ids"]
    assert not np.array_equal(a, b)
    _assert_same_batches("sft", files, tmp_path / "p", tok, 256, 8, add_system_prompt_prob=1.0,
                         drop_empty_think_prob=1.0)


def test_workers_resume_and_rerun(tok, tmp_path):
    """A pool of workers gives the in-process result; a run stopped after one chunk and rerun gives it too; a
    rerun of a complete directory returns at once; a failed rerun with other inputs leaves it intact."""
    files = [SAMPLE / "dpo.jsonl"]
    ref = _prepare("dpo", files, tmp_path / "ref", tok)
    _prepare("dpo", files, tmp_path / "pool", tok, workers=2)
    assert _prepare("dpo", files, tmp_path / "resumed", tok, max_chunks=1) is None
    assert not (tmp_path / "resumed" / "meta.json").exists()
    _prepare("dpo", files, tmp_path / "resumed", tok)
    names = ("tokens.bin", "offsets.npy", "flags.npy")
    for other in ("pool", "resumed"):
        for name in names:
            assert (tmp_path / other / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (other, name)
    before = {n: (tmp_path / "ref" / n).read_bytes() for n in (*names, "meta.json")}
    assert _prepare("dpo", files, tmp_path / "ref", tok)["documents"] == ref["documents"]
    with pytest.raises(FileExistsError):
        _prepare("sft", [SAMPLE / "sft.jsonl"], tmp_path / "ref", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": [], "rejected"\n')
    with pytest.raises(FileExistsError):
        _prepare("dpo", [bad], tmp_path / "ref", tok)
    assert {n: (tmp_path / "ref" / n).read_bytes() for n in before} == before
    with pytest.raises(DataError, match="bad.jsonl:1:"):  # even with overwrite: prepared aside, swapped in when done
        _prepare("dpo", [bad], tmp_path / "ref", tok, overwrite=True)
    assert {n: (tmp_path / "ref" / n).read_bytes() for n in before} == before
    meta = _prepare("sft", [SAMPLE / "sft_tools.jsonl"], tmp_path / "ref", tok, overwrite=True)
    assert meta["stage"] == "sft" and not (tmp_path / "ref.overwrite").exists()
    assert len(PreparedChatSource(tmp_path / "ref", "sft")) == 200


def test_stage_is_checked_when_opened(tok, tmp_path):
    _prepare("dpo", [SAMPLE / "dpo.jsonl"], tmp_path / "dpo", tok)
    for stage in ("sft", "pretrain", "rlaif"):
        with pytest.raises(DataError, match=r"prepared for the dpo stage.*not (sft|pretrain|rlaif) data") as e:
            make_dataset(stage, [str(tmp_path / "dpo")], tok, 64, 4)
        assert "\n" not in str(e.value)
    assert isinstance(open_prepared(tmp_path / "dpo", "dpo"), PreparedChatSource)


@pytest.mark.parametrize("stage, data", [("sft", "sft_tools.jsonl"), ("dpo", "dpo.jsonl")])
def test_out_of_vocabulary_ids_are_named_before_training(stage, data, tok, tmp_path):
    """An id past the vocabulary in a prepared chat directory (it would index past the embedding: NaN at step
    1) is one DataError naming tokens.bin and the record, when the dataset is made."""
    _prepare(stage, [SAMPLE / data], tmp_path / stage, tok)
    meta = json.loads((tmp_path / stage / "meta.json").read_text())
    path = tmp_path / stage / "tokens.bin"
    tokens = np.fromfile(path, meta["dtype"])
    tokens[len(tokens) // 2] = len(tok) + 7
    tokens.tofile(path)
    with pytest.raises(DataError, match=f"^{path}: token {len(tokens) // 2} .* is id {len(tok) + 7}, outside the "
                                        f"tokenizer's vocabulary of {len(tok)} ids$"):
        make_dataset(stage, [str(tmp_path / stage)], tok, 64, 2)


TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": '[{"name": "f", "arguments": {}}]'}


@pytest.mark.parametrize("line, reason", [
    (b'{"conversations": [{"role": "user", "content": "hi"}', "malformed JSON"),
    (b'{"conversations": [{"role": "user", "content": "\xff"}]}', "not UTF-8"),
    (json.dumps({"conversations": [{"role": "system", "content": "", "tools": "[{not json"},
                                   {"role": "user", "content": "q"}, TOOL_CALL]}).encode(),
     r"conversations\[0\]\.tools is a string that is not valid JSON"),
])
def test_bad_lines_name_file_line_and_field(line, reason, tok, tmp_path):
    good = (SAMPLE / "sft_tools.jsonl").read_bytes().splitlines(keepends=True)[:5]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(good[:3]) + line + b"\n" + b"".join(good[3:]))
    with pytest.raises(DataError, match=rf"d\.jsonl:4: .*{reason}") as e:
        _prepare("sft", [data], tmp_path / "p", tok, chunk_lines=2)
    assert "\n" not in str(e.value)
    assert (tmp_path / "p" / "progress.json").exists() and not (tmp_path / "p" / "meta.json").exists()
    with pytest.raises(DataError, match=r"d\.jsonl:4: "):  # a rerun resumes at the bad chunk and stops there
        _prepare("sft", [data], tmp_path / "p", tok, chunk_lines=2)
    meta = _prepare("sft", [data], tmp_path / "q", tok, skip_bad_lines=True)
    assert (meta["documents"], meta["bad_lines"]) == (5, 1) and "d.jsonl:4:" in meta["bad"][0]
    source = PreparedChatSource(tmp_path / "q")
    assert len(source) == 5 and source.stats.bad_lines == 1


def test_empty_file_and_directory(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        _prepare("sft", [empty], tmp_path / "p", tok)
    with pytest.raises(DataError, match="directory"):
        _prepare("sft", [tmp_path], tmp_path / "p", tok)
    assert not (tmp_path / "p" / "meta.json").exists()


def test_cli(tok, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = M3_TOKENIZER if (M3_TOKENIZER / "tokenizer.json").is_file() else TOKENIZER_DIR
    out = tmp_path / "rl"
    argv = ["--stage", "rlaif", "--data_path", str(SAMPLE / "rlaif.jsonl"), "--out", str(out), "--tokenizer",
            str(tokenizer), "--workers", "0"]
    assert module.main(argv) == 0
    assert "300 rlaif records" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["stage"] == "rlaif"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "q"}]}\n')
    assert module.main(["--stage", "rlaif", "--data_path", str(bad), "--out", str(tmp_path / "x"), "--tokenizer",
                        str(tokenizer), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1:" in err and "conversations[-1]" in err and os.path.isdir(out)


def test_fast_assistant_labels_equal_the_scan():
    """The numpy marker search gives assistant_labels' result on random sequences dense in (partial, overlapping,
    cut) markers."""
    from minimind_jax.data.prepared_chat import fast_assistant_labels
    from minimind_jax.data.samples import ChatMarkers, assistant_labels

    rng = np.random.default_rng(0)
    for markers in (ChatMarkers((1, 2), (3, 4), 0), ChatMarkers((1,), (1, 3), 0), ChatMarkers((5, 5), (5,), 0)):
        for _ in range(300):
            ids = rng.integers(0, 7, rng.integers(0, 40)).astype(np.int32)
            np.testing.assert_array_equal(fast_assistant_labels(ids, markers), assistant_labels(ids, markers),
                                          err_msg=f"{markers} {ids.tolist()}")
