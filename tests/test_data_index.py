"""The jsonl line index (newline scan, cache), lazy / full validation, prepare_data.py --check, and the
warnings for data that would be skipped or trained at loss 0 without a word."""

import importlib.util
import json
import logging
import os
import pickle
import random

import numpy as np
import pytest

from minimind_jax.data import DataError, JsonlSource, make_dataset
from minimind_jax.data import jsonl_index
from minimind_jax.data.jsonl import check_file, check_index
from minimind_jax.data.jsonl_index import line_index, scan
from minimind_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("MINIMIND_JAX_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def reference(data: bytes):
    """(offsets, line numbers) of the non-blank lines, the way a line-by-line reader sees them."""
    offsets, lines, pos = [], [], 0
    if data.startswith(b"\xef\xbb\xbf"):
        pos = 3
    for number, raw in enumerate(data[pos:].split(b"\n"), start=1):
        if raw.strip():
            offsets.append(pos)
            lines.append(number)
        pos += len(raw) + 1
    return offsets, lines


def tricky_bytes(seed: int) -> bytes:
    rng = random.Random(seed)
    parts = [b"\xef\xbb\xbf"] if seed % 2 else []
    for _ in range(60):
        kind = rng.random()
        if kind < 0.15:
            parts.append(rng.choice([b"", b"   ", b"\t", b"\r", b" \x0b\x0c "]) + b"\n")
        elif kind < 0.25:
            parts.append(b'  {"text": "indented"}\r\n')
        else:
            parts.append(json.dumps({"text": "x" * rng.randint(0, 40)}).encode() + b"\n")
    data = b"".join(parts)
    return data.rstrip(b"\n") if seed % 3 == 0 else data  # sometimes no newline at the end


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scan_matches_a_line_reader_across_chunk_boundaries(tmp_path, monkeypatch, chunk, seed):
    monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", chunk)
    data = tricky_bytes(seed)
    path = tmp_path / "t.jsonl"
    path.write_bytes(data)
    index = scan(str(path))
    offsets, lines = reference(data)
    assert index.offsets.dtype == np.uint64 and index.offsets.tolist() == offsets
    assert [index.line_number(i) for i in range(len(index))] == lines
    assert index.total_lines == len(data[3 if seed % 2 else 0:].split(b"\n")) - int(data.endswith(b"\n"))
    assert index.blank_lines == index.total_lines - len(offsets) and index.size == len(data)


def test_empty_and_blank_only_files(tmp_path):
    for data, total in ((b"", 0), (b"\n\n  \n", 3), (b"\xef\xbb\xbf", 0)):
        (tmp_path / "e.jsonl").write_bytes(data)
        index = scan(str(tmp_path / "e.jsonl"))
        assert len(index) == 0 and index.total_lines == total and index.blank_lines == total


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    line_index(str(path))
    assert not cache_dir.exists()  # a small file is not worth caching
    monkeypatch.setattr(jsonl_index, "CACHE_MIN_BYTES", 0)
    first = line_index(str(path))
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy", ".npy"]  # offsets, lines, meta
    scans = []
    with monkeypatch.context() as patch:
        patch.setattr(jsonl_index, "scan", lambda *a: scans.append(a) or pytest.fail("rescanned"))
        cached = line_index(str(path))
    assert isinstance(cached.offsets.base, np.memmap) and cached.offsets.tolist() == first.offsets.tolist()
    assert cached.lines.tolist() == [1, 3] and not scans
    path.write_text('{"text": "a"}\n{"text": "bb"}\n{"text": "c"}\n')  # new size and mtime: a new key
    src = JsonlSource(path, "pretrain")
    assert [src[i]["text"] for i in range(3)] == ["a", "bb", "c"] and src.location(2).endswith("c.jsonl:3")
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    same = tmp_path / "same.jsonl"
    same.write_text('{"text": "a"}\n{"text": "bb"}\n')
    assert JsonlSource(same, "pretrain")[1] == {"text": "bb"}
    same.write_text('{"text": "aaa"}\n{"text": ""}\n')  # same size, lines moved: the mtime tells
    os.utime(same, ns=(10**18, 10**18))
    assert JsonlSource(same, "pretrain")[1] == {"text": ""}


def test_unwritable_cache_dir_still_opens(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_index, "CACHE_MIN_BYTES", 0)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("MINIMIND_JAX_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "u.jsonl"
    path.write_text('{"text": "a"}\n')
    assert JsonlSource(path, "pretrain")[0] == {"text": "a"}


def test_lazy_source_reads_validates_and_pickles(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join(json.dumps({"text": str(i)}) for i in range(50)) + '\n{"txt": 1}\n',
                    encoding="utf-8")
    src = JsonlSource([path, path], "pretrain")
    assert len(src) == 102 and src.stats.lines == 102 and src.stats.bad_lines == 0
    assert src[51]["text"] == "0" and src[-2]["text"] == "49" and src.location(101).endswith("l.jsonl:51")
    with pytest.raises(DataError, match=r"l\.jsonl:51: missing the field 'text'.*--check"):
        src[50]
    with pytest.raises(IndexError):
        src[102]
    again = pickle.loads(pickle.dumps(src))
    assert again[99]["text"] == "48"


def test_skip_bad_lines_logs_count_and_first_lines(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(GOOD)] * 3 + ["{broken"] * 7 + [json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="minimind_jax.data.jsonl"):
        src = JsonlSource(path, "sft", skip_bad_lines=True)
    assert len(src) == 4 and src.stats.bad_lines == 7 and src.location(3).endswith("s.jsonl:11")
    message = caplog.records[-1].getMessage()
    assert message.startswith("skipped 7 bad line(s) of 11: ") and f"{path}:4: malformed JSON" in message
    assert f"{path}:8:" in message and f"{path}:9:" not in message and "(and 2 more)" in message
    assert src[3] == GOOD


def test_parallel_check_equals_serial(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [json.dumps(GOOD) if i % 9 else '{"conversations": []}' for i in range(200)]
    rows[5] = ""
    path.write_text("\n".join(rows) + "\n")
    index = line_index(str(path))
    serial = check_index(str(path), index, "sft", workers=1)
    parallel = check_index(str(path), index, "sft", workers=2, chunk_bytes=1000)
    assert parallel == serial and len(serial) == 23
    report = check_file(path, "sft", workers=1)
    assert report.lines == 200 and report.blank_lines == 1 and report.records == 199 - 23
    assert report.bad[0] == (1, "field 'conversations' is an empty conversation")


def _prepare_data_script():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_check_reports_every_bad_line(tmp_path, capsys):
    script = _prepare_data_script()
    path = tmp_path / "k.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": 1}\n{bad\n{"text": "\\ud800"}\n')
    assert script.main(["--check", str(path), "--workers", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in out[:3]] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "5 lines, 1 valid pretrain records, 3 bad lines, 1 blank lines" in out[3]
    assert script.main(["--check", os.path.join(ROOT, "data", "sample", "sft.jsonl"), "--stage", "sft"]) == 0
    assert script.main(["--check", str(tmp_path)]) == 1 and "is a directory" in capsys.readouterr().err


def test_sft_with_every_reply_past_max_seq_len_is_an_error(tmp_path, tok, caplog):
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 100},
                                     {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([json.dumps(long_prompt)] * 8) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:1: none of the first 8 records has a trained token.*"
                                        r"max_seq_len=32"):
        make_dataset("sft", path, tok, 32, 2)
    make_dataset("sft", path, tok, 256, 2)  # long enough: fine
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([json.dumps(long_prompt)] * 6 + [json.dumps(GOOD)] * 2) + "\n")
    with caplog.at_level(logging.WARNING, logger="minimind_jax.data.pipeline"):
        pipe = make_dataset("sft", mixed, tok, 32, 2, shuffle=False)
    assert "6 of the first 8 records have no trained token" in caplog.text
    list(pipe)
    assert pipe.stats.untrained == 6 and pipe.stats.transformed == 8
