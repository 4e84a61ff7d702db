"""Pre-tokenised pretrain data (minimind_jax/data/prepared.py, scripts/prepare_data.py)."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from minimind_jax.data import DataError, PreparedSource, encode_pretrain, make_dataset, prepare
from minimind_jax.data.prepared import tokenizer_fingerprint
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "minimind_jax" / "assets" / "tokenizer"
SAMPLE = ROOT / "data" / "sample" / "pretrain.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def texts():
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def prepared(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(SAMPLE, out, tok, tokenizer_path=str(TOKENIZER_DIR), workers=2, chunk_lines=1000, progress=False)
    return out


def _files(directory):
    return {name: (directory / name).read_bytes() for name in ("tokens.bin", "offsets.npy")}


def _meta(directory):
    meta = json.loads((directory / "meta.json").read_text())
    meta.pop("last_run_seconds")
    return meta


def test_round_trip(prepared, tok, texts):
    source = PreparedSource(prepared)
    assert len(source) == len(texts) == 4000
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(source[i]["ids"], tok.encode(text, add_special_tokens=False), err_msg=str(i))
    assert source[-1]["ids"].dtype == np.int32


def test_meta_contents(prepared, tok, texts):
    meta = json.loads((prepared / "meta.json").read_text())
    offsets = np.load(prepared / "offsets.npy")
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert meta["format_version"] == 1 and meta["stage"] == "pretrain" and meta["dtype"] == "uint16"
    assert meta["documents"] == len(texts) and meta["tokens"] == n_tokens
    assert offsets.dtype == np.int64 and len(offsets) == len(texts) + 1 and offsets[0] == 0
    assert offsets[-1] == n_tokens == os.path.getsize(prepared / "tokens.bin") // 2
    assert meta["tokenizer"] == {"path": str(TOKENIZER_DIR), "sha256": tokenizer_fingerprint(tok), "vocab_size": 6400,
                                 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (src,) = meta["sources"]
    st = os.stat(SAMPLE)
    assert src["path"] == str(SAMPLE) and src["size"] == st.st_size and src["mtime"] == st.st_mtime
    assert src["lines"] == 4000 and src["documents"] == 4000 and src["bad_lines"] == 0
    assert meta["bad_lines"] == 0 and meta["blank_lines"] == 0 and meta["bad"] == []
    assert not (prepared / "progress.json").exists() and not (prepared / "offsets.part").exists()


def test_encode_prepared_matches_encode_pretrain(prepared, tok, texts):
    transform = PreparedSource(prepared).transform(tok, 48)
    source = PreparedSource(prepared)
    for i in (0, 1, 7, 100, 3999):
        want = encode_pretrain({"text": texts[i]}, tok, 48)
        got = transform(source[i], None)
        assert got.truncated == want.truncated
        for k in ("input_ids", "labels"):
            np.testing.assert_array_equal(got.arrays[k], want.arrays[k])
            assert got.arrays[k].dtype == np.int32


@pytest.mark.parametrize("max_seq_len,epochs", [(64, 1), (512, 2)])
def test_identical_batches_raw_vs_prepared(prepared, tok, max_seq_len, epochs):
    kw = dict(seed=3, epochs=epochs, shard_index=1, shard_count=2)
    raw = make_dataset("pretrain", [SAMPLE], tok, max_seq_len, 16, **kw)
    prep = make_dataset("pretrain", [prepared], tok, max_seq_len, 16, **kw)
    assert isinstance(prep.source, PreparedSource) and len(raw) == len(prep)
    n = 0
    for a, b in zip(raw, prep, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype == np.int32
            np.testing.assert_array_equal(a[k], b[k])
        n += 1
    assert n == len(raw)
    # checkpointed iterator state works the same way
    it = prep.iterator()
    next(it), next(it)
    state = it.get_state()
    want = next(it)
    got = next(prep.iterator(state))
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_resume_equals_uninterrupted(tmp_path, tok):
    full, part = tmp_path / "full", tmp_path / "part"
    prepare(SAMPLE, full, tok, workers=2, chunk_lines=4096, progress=False)
    assert prepare(SAMPLE, part, tok, workers=2, chunk_lines=700, max_chunks=2, progress=False) is None
    state = json.loads((part / "progress.json").read_text())
    assert state["line_no"] == 1401 and not (part / "meta.json").exists()
    with pytest.raises(DataError, match="no meta.json"):
        PreparedSource(part)
    # a kill after writing part of a chunk: uncommitted bytes are dropped on resume
    with open(part / "tokens.bin", "ab") as f:
        f.write(b"\x07\x00" * 123)
    with open(part / "offsets.part", "ab") as f:
        f.write(b"\x01" * 13)
    assert prepare(SAMPLE, part, tok, workers=0, chunk_lines=300, max_chunks=3, progress=False) is None
    assert json.loads((part / "progress.json").read_text())["line_no"] == 1401 + 900
    meta = prepare(SAMPLE, part, tok, workers=2, chunk_lines=1000, progress=False)
    assert meta["documents"] == 4000
    assert _files(part) == _files(full)
    assert _meta(part) == _meta(full)
    # rerunning a finished preparation is a no-op; other inputs need overwrite
    assert prepare(SAMPLE, part, tok, progress=False)["tokens"] == meta["tokens"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "hello"}\n')
    with pytest.raises(FileExistsError):
        prepare(other, part, tok, progress=False)
    assert prepare(other, part, tok, workers=0, overwrite=True, progress=False)["documents"] == 1


def test_multiple_files_in_order(tmp_path, tok):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "one"}\n{"text": "two"}\n')
    b.write_text('{"text": "three"}\n')
    meta = prepare([a, b], tmp_path / "out", tok, workers=2, chunk_lines=1, progress=False)
    assert [s["documents"] for s in meta["sources"]] == [2, 1]
    src = PreparedSource(tmp_path / "out")
    for i, text in enumerate(["one", "two", "three"]):
        assert src[i]["ids"].tolist() == tok.encode(text, add_special_tokens=False)


def test_packing_preserves_tokens(prepared, tok):
    docs = PreparedSource(prepared)
    framed = [np.concatenate([[tok.bos_token_id], docs[i]["ids"], [tok.eos_token_id]]) for i in range(len(docs))]
    stream = np.concatenate(framed)
    at_bos = np.concatenate([np.arange(len(f)) == 0 for f in framed])
    for seq in (64, 509):
        packed = PreparedSource(prepared, pack=True, max_seq_len=seq)
        assert len(packed) == len(stream) // seq
        rows = [packed[i] for i in range(len(packed))]
        for r in rows:
            assert r["input_ids"].shape == (seq,) and r["input_ids"].dtype == np.int32
        got = np.concatenate([r["input_ids"] for r in rows])
        # every token of every document framed by bos / eos, in order; only the final partial row is dropped
        np.testing.assert_array_equal(got, stream[: len(got)])
        assert 0 <= len(stream) - len(got) < seq
        # every label trained but the bos ones (no eos predicts the next document's bos)
        labels = np.concatenate([r["labels"] for r in rows])
        np.testing.assert_array_equal(labels, np.where(at_bos[: len(got)], -100, got))
    # through the pipeline: full rows, every label but the bos ones trained
    pipe = make_dataset("pretrain", [], tok, 64, 8, source=PreparedSource(prepared, pack=True, max_seq_len=64))
    batch = next(iter(pipe))
    assert batch["input_ids"].shape == (8, 64) and batch["segment_ids"].shape == batch["positions"].shape == (8, 64)
    np.testing.assert_array_equal(batch["labels"] == -100, batch["input_ids"] == tok.bos_token_id)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_dataset("pretrain", [], tok, 32, 8, source=PreparedSource(prepared, pack=True, max_seq_len=64))


def test_pack_default_recorded_at_prepare(tmp_path, tok):
    meta = prepare(SAMPLE, tmp_path / "p", tok, workers=0, pack_max_seq_len=128, progress=False)
    assert meta["pack_max_seq_len"] == 128
    pipe = make_dataset("pretrain", [tmp_path / "p"], tok, 128, 4)
    assert pipe.source.pack and len(pipe.source) == (meta["tokens"] + 2 * meta["documents"]) // 128


def test_bad_lines(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    lines = ['{"text": "good one"}', '{"text": "good two"}', "", '{"text": broken', '{"txt": "no text"}',
             '{"text": 5}', "[1, 2]", '{"text": "good three"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:4: malformed JSON.*skip-bad-lines"):
        prepare(path, tmp_path / "strict", tok, workers=2, chunk_lines=2, progress=False)
    # the chunk before the bad line was committed
    state = json.loads((tmp_path / "strict" / "progress.json").read_text())
    assert state["line_no"] == 3 and state["documents"] == 2
    meta = prepare(path, tmp_path / "skip", tok, workers=2, chunk_lines=2, skip_bad_lines=True, progress=False)
    assert meta["documents"] == 3 and meta["bad_lines"] == 4 and meta["blank_lines"] == 1
    assert meta["bad"][0].startswith(f"{path}:4: malformed JSON")
    assert [m.split(": ")[0] for m in meta["bad"]] == [f"{path}:{n}" for n in (4, 5, 6, 7)]
    assert "missing the field 'text'" in meta["bad"][1]
    src = PreparedSource(tmp_path / "skip")
    assert src.stats.bad_lines == 4 and src.stats.lines == 8
    assert [src[i]["ids"].tolist() for i in range(3)] == [tok.encode(t, add_special_tokens=False)
                                                         for t in ("good one", "good two", "good three")]


def test_wrong_tokenizer_refused(prepared, tmp_path, tok):
    config = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    config["added_tokens"][0]["content"] = "<|other|>"
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    try:
        other = load_tokenizer(d)
    except Exception:  # pragma: no cover - config names the changed token
        pytest.skip("cannot build a variant tokenizer")
    with pytest.raises(DataError, match="another tokenizer"):
        make_dataset("pretrain", [prepared], other, 64, 8)


def test_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cli"
    assert mod.main(["--data", str(SAMPLE), "--out", str(out), "--workers", "2", "--chunk-lines", "1500",
                     "--pack", "--max_seq_len", "256"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 4000 and meta["pack_max_seq_len"] == 256
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    assert mod.main(["--data", str(bad), "--out", str(tmp_path / "bad")]) == 1


def test_offsets_are_memory_mapped_and_checked_in_blocks(prepared, tmp_path):
    from minimind_jax.data.prepared import _non_decreasing

    assert isinstance(PreparedSource(prepared).offsets, np.memmap)  # not read into each process's memory

    values = np.arange(10)
    assert all(_non_decreasing(values, block=b) for b in (1, 2, 3, 9, 10, 100))
    for at in range(1, 10):  # a decrease anywhere, block boundaries included, is found
        bad = values.copy()
        bad[at] = bad[at - 1] - 1
        assert not any(_non_decreasing(bad, block=b) for b in (1, 2, 3, 4, 9, 100)), at
    assert _non_decreasing(np.arange(1)) and _non_decreasing(np.arange(0))
    np.save(tmp_path / "o.npy", values)
    mapped = np.load(tmp_path / "o.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and _non_decreasing(mapped, block=4)
