"""Bad data input is a one-line DataError naming the file (and line), at every stage that reads it: jsonl
sources and pipelines, ``scripts/prepare_data.py`` (prepare and --check), and prepared directories at open."""

import importlib.util
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest

from minimind_jax.data.jsonl import DataError, JsonlSource, check_file
from minimind_jax.data.pipeline import make_dataset
from minimind_jax.data.prepared import PreparedSource, prepare
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "minimind_jax" / "assets" / "tokenizer")
TEXTS = ["hello world", "a second document, longer than the first", "third"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_data_faults", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("content, what", [("", "an empty file"), ("\n \n\t\n", "only 3 blank line(s)")])
@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_a_file_without_records_is_named(tmp_path, tok, content, what, stage):
    empty = _write(tmp_path / "e.jsonl", content)
    good = _write(tmp_path / "g.jsonl", json.dumps({"text": "x"}) + "\n")
    for kw in ({}, {"skip_bad_lines": True}, {"validate": "full"}):
        with pytest.raises(DataError, match=f"^{re.escape(f'{empty}: no records ({what})')}$"):
            JsonlSource(empty, stage, **kw)
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no records"):  # also among other files
        JsonlSource([good, empty], "pretrain")
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no records"):  # before: "shard 0/1 holds 0 records" ValueError
        make_dataset(stage, str(empty), tok, 32, 1)


def test_a_file_of_only_bad_lines_is_named_when_skipping(tmp_path):
    path = _write(tmp_path / "b.jsonl", '{"txt": 1}\n\n[1]\n')
    msg = f"{path}: no records: all 2 non-blank lines are bad (first: {path}:1: missing the field 'text')"
    with pytest.raises(DataError, match=f"^{re.escape(msg)}$"):
        JsonlSource(path, "pretrain", skip_bad_lines=True)


def test_a_line_over_the_limit_is_a_bad_line_refused_before_reading(tmp_path):
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines.insert(1, json.dumps({"text": "y" * 3000}))  # 3,014 bytes with its newline
    path = _write(tmp_path / "long.jsonl", "\n".join(lines) + "\n")
    size = len(lines[1]) + 1
    reason = re.escape(f"{path}:2: a line of {size:,} bytes, over the limit of 1,000 (max_line_bytes)")
    src = JsonlSource(path, "pretrain", max_line_bytes=1000)  # lazy: the error names the line when read
    assert src[0]["text"] == TEXTS[0]
    with pytest.raises(DataError, match=f"^{reason}"):
        src[1]
    with pytest.raises(DataError, match=f"^{reason}"):
        JsonlSource(path, "pretrain", validate="full", max_line_bytes=1000)
    skipped = JsonlSource(path, "pretrain", skip_bad_lines=True, max_line_bytes=1000)
    assert [skipped[i]["text"] for i in range(len(skipped))] == TEXTS
    assert skipped.stats.bad_lines == 1 and skipped.stats.bad[0].startswith(f"{path}:2: a line of {size:,} bytes")
    report = check_file(path, "pretrain", max_line_bytes=1000, workers=1)
    assert [line for line, _ in report.bad] == [2] and report.records == 3
    assert len(JsonlSource(path, "pretrain", validate="full")) == 4  # under the default limit (8 MiB)


def test_deeply_nested_json_is_a_bad_line_everywhere(tmp_path, tok):
    path = _write(tmp_path / "n.jsonl", '{"text": "ok"}\n' + "[" * 100000 + "\n" + '{"text": "ok 2"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: JSON nested too deeply"):
        JsonlSource(path, "pretrain")[1]
    assert len(make_dataset("pretrain", str(path), tok, 16, 1, skip_bad_lines=True)) == 2
    assert check_file(path, "pretrain", workers=1).bad == [(2, "JSON nested too deeply to read")]
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: JSON nested too deeply"):
        prepare(path, tmp_path / "prep", tok, workers=0, progress=False)
