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
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no records"):  # was a ValueError, not naming it
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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    base = tmp_path_factory.mktemp("prepared")
    data = _write(base / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare(data, base / "dir", tok, workers=0, progress=False)
    return base / "dir"


def _damaged(prepared, tmp_path, name, damage):
    """A copy of the prepared directory with file ``name`` passed through ``damage(path)``."""
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    damage(copy / name)
    return copy


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2 if keep is None else keep])


def _edit_meta(**changes):
    def damage(path):
        meta = json.loads(path.read_text())
        for key, value in changes.items():
            node = meta
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            if value is KeyError:
                del node[last]
            else:
                node[last] = value
        path.write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("name, damage, message", [
    ("tokens.bin", _truncate, "tokens.bin: truncated: {size} bytes, offsets.npy needs {tokens} uint16 tokens"),
    ("tokens.bin", os.remove, "tokens.bin: cannot be read (No such file or directory)"),
    ("meta.json", lambda p: _truncate(p, 40), "meta.json: cannot be read (Unterminated string"),
    ("meta.json", lambda p: p.write_text("[1, 2]"), "meta.json: holds a JSON list, not an object"),
    ("meta.json", _edit_meta(dtype=KeyError), "meta.json: key 'dtype' must be a str, got None"),
    ("meta.json", _edit_meta(dtype="float64"), "meta.json: key 'dtype' must be 'uint16' or 'uint32'"),
    ("meta.json", _edit_meta(documents="3"), "meta.json: key 'documents' must be a int, got '3'"),
    ("meta.json", _edit_meta(**{"tokenizer.sha256": KeyError}), "meta.json: key 'tokenizer.sha256' must be a string"),
    ("meta.json", _edit_meta(documents=2), "offsets.npy: holds int64 (4,), not the int64 (3,)"),
    ("meta.json", _edit_meta(tokens=1), "offsets.npy: not the non-decreasing document starts from 0 to meta.json's 1"),
    ("offsets.npy", lambda p: _truncate(p, 100), "offsets.npy: cannot be read"),
])
def test_a_damaged_prepared_directory_is_named_at_open(prepared, tmp_path, tok, name, damage, message):
    meta = json.loads((prepared / "meta.json").read_text())
    message = message.format(size=2 * meta["tokens"] - 2, tokens=meta["tokens"])
    copy = _damaged(prepared, tmp_path, name, damage)
    for open_it in (lambda: PreparedSource(copy), lambda: make_dataset("pretrain", str(copy), tok, 16, 1)):
        with pytest.raises(DataError) as info:
            open_it()
        assert str(info.value).startswith(f"{copy}{os.sep}{message}"), str(info.value)
        assert "\n" not in str(info.value)


def test_out_of_vocabulary_ids_are_named_before_training(prepared, tmp_path, tok):
    def poke(path):  # document 1's second token becomes an id past the 6400-token vocabulary
        tokens = np.fromfile(path, np.uint16)
        tokens[len(tok.encode(TEXTS[0], add_special_tokens=False)) + 1] = 65000
        tokens.tofile(path)
    copy = _damaged(prepared, tmp_path, "tokens.bin", poke)
    first = len(tok.encode(TEXTS[0], add_special_tokens=False)) + 1
    source = PreparedSource(copy)  # opening is cheap: the ids are checked with the tokenizer
    msg = (f"{copy / 'tokens.bin'}: token {first} (document 1) is id 65000, outside the tokenizer's vocabulary of "
           "6400 ids")
    with pytest.raises(DataError, match=f"^{re.escape(msg)}$"):
        make_dataset("pretrain", str(copy), tok, 16, 1)
    with pytest.raises(DataError, match=f"^{re.escape(msg)}$"):
        source.check_tokenizer(tok)
    assert len(make_dataset("pretrain", str(prepared), tok, 16, 1)) == 3  # the intact one reads


def test_an_empty_prepared_directory_is_refused(prepared, tmp_path, tok):
    copy = _damaged(prepared, tmp_path, "meta.json", _edit_meta(documents=0, tokens=0))
    np.save(copy / "offsets.npy", np.zeros(1, np.int64))
    (copy / "tokens.bin").write_bytes(b"")
    with pytest.raises(DataError, match=f"^{re.escape(str(copy))}: no records"):
        PreparedSource(copy)


def test_prepare_refuses_inputs_without_records_and_damaged_state(tmp_path, tok, prepared):
    empty = _write(tmp_path / "e.jsonl", b"\xef\xbb\xbf\n\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no records \\(only blank lines\\)$"):
        prepare(empty, tmp_path / "out", tok, workers=0, progress=False)
    assert not (tmp_path / "out").exists()  # nothing written
    bad = _write(tmp_path / "bad.jsonl", '{"txt": 1}\n[2]\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: no records: all 2 non-blank lines"):
        prepare(bad, tmp_path / "skip", tok, workers=0, skip_bad_lines=True, progress=False)
    assert not (tmp_path / "skip" / "meta.json").exists()
    copy = _damaged(prepared, tmp_path, "meta.json", lambda p: _truncate(p, 40))
    source = json.loads((prepared / "meta.json").read_text())["sources"][0]["path"]
    with pytest.raises(DataError, match=f"^{re.escape(str(copy / 'meta.json'))} cannot be read .*--overwrite"):
        prepare(source, copy, tok, workers=0, progress=False)
    assert prepare(source, copy, tok, workers=0, overwrite=True, progress=False)["documents"] == 3
    (tmp_path / "part").mkdir()
    _write(tmp_path / "part" / "progress.json", "{")  # an unfinished preparation's damaged state
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'part' / 'progress.json'))} cannot be read"):
        prepare(source, tmp_path / "part", tok, workers=0, progress=False)


def test_prepare_data_script_exits_1_with_one_line(tmp_path, capsys):
    script = _script("prepare_data")
    empty = _write(tmp_path / "e.jsonl", "")
    assert script.main(["--check", str(empty)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {empty}: no records (an empty file)"]
    assert script.main(["--data", str(empty), "--out", str(tmp_path / "out"), "--workers", "0"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {empty}: no records (an empty file)"


def test_prepare_steps_over_a_byte_order_mark_and_names_a_directory(tmp_path, tok):
    bom = _write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "bom first"}\n{"text": "two"}\n')
    prepare(bom, tmp_path / "out", tok, workers=0, progress=False)  # line 1 was a bad line (malformed JSON)
    source = PreparedSource(tmp_path / "out")
    assert [source[i]["ids"].tolist() for i in range(2)] == [
        tok.encode(JsonlSource(bom, "pretrain")[i]["text"], add_special_tokens=False) for i in range(2)]
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: is a directory, not a jsonl file"):
        prepare(tmp_path, tmp_path / "dir", tok, workers=0, progress=False)


def test_fewer_records_than_one_batch_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "hello"}\n')
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "train.py"), "--data_path", str(data),
                          "--batch_size", "8", "--max_steps", "1", "--out_dir", str(tmp_path / "out"),
                          "--progress", "false", "model.hidden_size=64", "model.num_hidden_layers=1",
                          "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=32",
                          "model.intermediate_size=128"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 2 and "holds 1 records, fewer than one batch of 8" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
