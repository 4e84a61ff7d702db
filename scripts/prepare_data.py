#!/usr/bin/env python
"""Pre-tokenise MiniMind jsonl into the compact format of ``minimind_jax/data/prepared.py`` (tokens.bin +
offsets.npy + meta.json; chat stages also flags.npy and, for RL, extra.bin), resumably.

  python scripts/prepare_data.py [--stage pretrain] --data_path pretrain_hq.jsonl --out data/prepared/pretrain \\
      [--tokenizer minimind_jax/assets/tokenizer] [--workers 2] [--chunk-lines 4096] [--skip-bad-lines] \\
      [--pack --max_seq_len 512] [--overwrite]
  python scripts/prepare_data.py --stage sft|dpo|rlaif|agent --data_path FILE [FILE ...] --out DIR [...]

Rerunning the same command after a kill continues from the last committed chunk. Train on it with
``make_dataset(stage, ["DIR"], ...)`` (``python scripts/train.py --stage STAGE --data_path DIR``): the same
batches as the jsonl files, augmentations still drawn per epoch (``minimind_jax/data/prepared_chat.py``); a
directory prepared for another stage is refused. ``--pack`` (pretrain) records a default packing
(``max_seq_len``-token rows of the document stream) that the reader applies; the files are the same.

  python scripts/prepare_data.py --check FILE [FILE ...] [--stage sft] [--workers N]

validates every line of each file for the stage (in parallel processes) and prints the counts and every bad
line as ``file:line: reason``; exit status 1 when any line is bad. (Training validates each record when it is
read; this finds every bad line up front.)

  python scripts/prepare_data.py --bench-open [--bench-mb 1200] [--workers 2]

writes a synthetic pretrain jsonl of about that size (records of ~2.4 kB, like pretrain_t2t_mini.jsonl) to a
temporary directory and prints the time and extra RSS of opening it as a JsonlSource (first open: newline scan
and cache write; cached open), random-access reads per second, and the full --check time.

  python scripts/prepare_data.py --bench --stage sft|dpo|rlaif|agent [--bench-mb 4] [--workers 2]

the same for a chat stage (data/sample files repeated): preparation records/s and tokens/s next to raw
``encode_batch`` on the same rendered texts (every stored form), and pipeline batches/s, prepared vs jsonl.

  python scripts/prepare_data.py --bench [--bench-mb 20] [--workers 2]

prints preparation throughput next to the raw ``tokenizers`` ``encode_batch`` throughput on the same text
(data/sample/pretrain.jsonl repeated to ~20 MB in a temporary directory), and pipeline batches/s reading the
prepared data (batch 32 x 512, unpacked and packed; and the raw jsonl pipeline for comparison). Also
``python scripts/bench.py data``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_TOKENIZER = os.path.join(ROOT, "minimind_jax", "assets", "tokenizer")
SAMPLE = os.path.join(ROOT, "data", "sample", "pretrain.jsonl")


def run_prepare(args) -> int:
    from minimind_jax.data.jsonl import DataError, canonical_stage
    from minimind_jax.data.prepared import prepare
    from minimind_jax.data.prepared_chat import prepare_chat
    from minimind_jax.tokenizer import load_tokenizer

    if not args.data or not args.out:
        raise SystemExit("--data_path and --out are required (or --bench)")
    stage = canonical_stage(args.stage)
    if args.pack and (not args.max_seq_len or stage != "pretrain"):
        raise SystemExit("--pack needs --max_seq_len, and applies to pretrain data only")
    tokenizer = load_tokenizer(args.tokenizer)
    kwargs = {"tokenizer_path": os.path.abspath(args.tokenizer), "workers": args.workers,
              "chunk_lines": args.chunk_lines, "skip_bad_lines": args.skip_bad_lines, "overwrite": args.overwrite}
    try:
        if stage == "pretrain":
            meta = prepare(args.data, args.out, tokenizer, pack_max_seq_len=args.max_seq_len if args.pack else None,
                           **kwargs)
        else:
            meta = prepare_chat(stage, args.data, args.out, tokenizer, **kwargs)
    except (DataError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "documents" if stage == "pretrain" else "records"
    print(f"{args.out}: {meta['documents']:,} {stage} {kind}, {meta['tokens']:,} tokens ({meta['dtype']}), "
          f"{meta['bad_lines']} bad lines skipped, {meta['blank_lines']} blank lines")
    return 0


def run_check(args) -> int:
    from minimind_jax.data.jsonl import DataError, check_file

    status = 0
    for path in args.check:
        try:
            report = check_file(path, args.stage, workers=args.workers or None)
        except (DataError, FileNotFoundError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        for line, reason in report.bad:
            print(f"{path}:{line}: {reason}")
        print(f"{path}: {report.lines:,} lines, {report.records:,} valid {args.stage} records, "
              f"{len(report.bad):,} bad lines, {report.blank_lines:,} blank lines ({report.seconds:.1f} s)")
        status = status or int(bool(report.bad))
        if not report.records and not report.bad:
            print(f"error: {path}: no records ({'only blank lines' if report.lines else 'an empty file'})",
                  file=sys.stderr)
            status = 1
    return status


_WORDS = ("数据", "模型", "训练", "the", "model", "learns", "一个", "小", "语言", "token", "attention", "今天")


def write_synthetic_pretrain(path: str, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of ``{"text": ...}`` lines (~2.4 kB each) to ``path``; returns the count."""
    rng = random.Random(seed)
    target, size, n = int(megabytes * 1e6), 0, 0
    with open(path, "wb") as f:
        while size < target:
            rows = [json.dumps({"text": " ".join(rng.choices(_WORDS, k=rng.randint(200, 700)))},
                               ensure_ascii=False).encode() + b"\n" for _ in range(1000)]
            block = b"".join(rows)
            f.write(block)
            size, n = size + len(block), n + len(rows)
    return n


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _timed_open(path: str, **kwargs):
    """(source, seconds, extra peak RSS bytes) of opening ``path``; the peak is reset first where Linux allows."""
    from minimind_jax.data.jsonl import JsonlSource

    base = _rss("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    source = JsonlSource(path, "pretrain", **kwargs)
    return source, time.perf_counter() - t0, max(0, _rss("VmHWM") - base)


def bench_open(bench_mb: float = 1200.0, workers: int = 2) -> dict:
    """Print and return the open / cached-open / random-access / --check figures on a synthetic file."""
    from minimind_jax.data.jsonl import check_file

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = os.path.join(tmp, "pretrain.jsonl"), os.path.join(tmp, "index_cache")
        t0 = time.perf_counter()
        n = write_synthetic_pretrain(data, bench_mb)
        size = os.path.getsize(data)
        print(f"data: synthetic {size / 1e6:,.0f} MB, {n:,} records (written in {time.perf_counter() - t0:.1f} s), "
              f"{os.cpu_count()} CPUs")
        for label in ("first open (newline scan, index cached)", "cached open (index memory-mapped)"):
            source, dt, extra = _timed_open(data, cache_dir=cache)
            assert len(source) == n
            out[label.split(" (")[0]] = {"seconds": dt, "extra_rss_mb": extra / 2**20}
            print(f"{label}: {dt:.3f} s, extra peak RSS {extra / 2**20:.0f} MiB")
        rng = random.Random(1)
        picks = [rng.randrange(n) for _ in range(2000)]
        t0 = time.perf_counter()
        for i in picks:
            source[i]
        rate = len(picks) / (time.perf_counter() - t0)
        out["random_reads_s"] = rate
        print(f"random access: {rate:,.0f} records/s (read, parse, validate)")
        report = check_file(data, "pretrain", workers=workers, cache_dir=cache)
        out["check_seconds"] = report.seconds
        print(f"full check (prepare_data.py --check, {workers} workers): {report.seconds:.1f} s "
              f"= {size / 1e6 / report.seconds:,.0f} MB/s, {len(report.bad)} bad lines")
    return out


def bench_data(bench_mb: float = 20.0, workers: int = 2, batch: int = 32, seq: int = 512,
               chunk_lines: int = 4096, tokenizer_dir: str = DEFAULT_TOKENIZER) -> dict:
    """Print and return preparation / raw encode_batch throughput (tokens/s) and prepared-pipeline batches/s."""
    from minimind_jax.data.pipeline import make_dataset
    from minimind_jax.data.prepared import PreparedSource, prepare
    from minimind_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    with open(SAMPLE, "rb") as f:
        sample = f.read()
    repeats = max(1, round(bench_mb * 1e6 / len(sample)))
    out: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pretrain.jsonl")
        with open(data, "wb") as f:
            for _ in range(repeats):
                f.write(sample)
        size = os.path.getsize(data)
        print(f"data: {SAMPLE} x {repeats} = {size / 1e6:.1f} MB, {os.cpu_count()} CPUs")

        with open(data, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        backend = tokenizer._tok
        backend.encode_batch(texts[:1000], add_special_tokens=False)  # warm up the thread pool
        t0 = time.perf_counter()
        n_raw = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
        raw = n_raw / (time.perf_counter() - t0)
        out["raw_encode_batch_tok_s"] = raw
        print(f"raw tokenizers encode_batch (texts already parsed, Rust threads): {raw:,.0f} tokens/s "
              f"({n_raw:,} tokens)")
        del texts

        for w in sorted({workers, 0}, reverse=True):
            target = os.path.join(tmp, f"prepared_w{w}")
            t0 = time.perf_counter()
            meta = prepare(data, target, tokenizer, workers=w, chunk_lines=chunk_lines, progress=False)
            dt = time.perf_counter() - t0
            rate = meta["tokens"] / dt
            assert meta["tokens"] == n_raw, (meta["tokens"], n_raw)
            key = f"prepare_workers{w}_tok_s"
            out[key] = rate
            how = f"pool of {w} processes" if w else "in-process encode_batch (Rust threads)"
            print(f"prepare_data --workers {w} ({how}; end to end: read, parse, validate, encode, write): "
                  f"{rate:,.0f} tokens/s = {rate / raw:.0%} of raw encode_batch ({dt:.2f} s)")

        target = os.path.join(tmp, f"prepared_w{workers}")
        for kind in ("jsonl", "unpacked", "packed"):
            if kind == "jsonl":  # the raw pipeline (tokenising every record in the transform), for comparison
                pipe = make_dataset("pretrain", [data], tokenizer, seq, batch, epochs=None)
            else:
                pack = kind == "packed"
                source = PreparedSource(target, pack=pack, max_seq_len=seq if pack else None)
                pipe = make_dataset("pretrain", [], tokenizer, seq, batch, source=source, epochs=None)
            it = iter(pipe)
            next(it)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3.0:
                b = next(it)
                n += 1
            dt = time.perf_counter() - t0
            assert b["input_ids"].shape == (batch, seq)
            out[f"pipeline_{kind}_batches_s"] = n / dt
            what = "raw jsonl (tokenising on the fly)" if kind == "jsonl" else f"prepared data, {kind}"
            print(f"pipeline reading {what} (shuffled, batch {batch} x {seq}, default read options): "
                  f"{n / dt:,.1f} batches/s = {n * batch * seq / dt:,.0f} tokens/s")
    return out


CHAT_SAMPLES = {"sft": ["sft.jsonl", "sft_tools.jsonl"], "dpo": ["dpo.jsonl"], "rlaif": ["rlaif.jsonl"],
                "agent": ["agent_rl.jsonl"]}
_CHAT_AUGMENT = {"sft": {"add_system_prompt_prob": 0.2, "drop_empty_think_prob": 0.8},
                 "dpo": {"drop_empty_think_prob": 0.8}, "rlaif": {"add_system_prompt_prob": 0.2}, "agent": {}}


def _repeat_samples(names, path: str, megabytes: float) -> int:
    """Write data/sample/NAMES repeated to about ``megabytes`` MB to ``path``; returns the repeat count."""
    sample = b"".join(open(os.path.join(os.path.dirname(SAMPLE), n), "rb").read() for n in names)
    repeats = max(1, round(megabytes * 1e6 / len(sample)))
    with open(path, "wb") as f:
        for _ in range(repeats):
            f.write(sample)
    return repeats


def _batches_per_s(pipe, seconds: float = 3.0) -> float:
    it = iter(pipe)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n / (time.perf_counter() - t0)


def bench_chat(stage: str, bench_mb: float = 4.0, workers: int = 2, batch: int = 16, seq: int = 512,
               chunk_lines: int = 1024, tokenizer_dir: str = DEFAULT_TOKENIZER) -> dict:
    """Print and return chat-stage preparation records/s and tokens/s next to raw ``encode_batch`` on the same
    rendered texts, and pipeline batches/s reading the prepared directory vs the jsonl file (MiniMind's
    augmentation probabilities on)."""
    from minimind_jax.data.jsonl import normalize_record
    from minimind_jax.data.pipeline import make_dataset
    from minimind_jax.data.prepared_chat import ChatRecordEncoder, prepare_chat
    from minimind_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    out: dict = {"cpus": os.cpu_count(), "stage": stage}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, f"{stage}.jsonl")
        repeats = _repeat_samples(CHAT_SAMPLES[stage], data, bench_mb)
        encoder = ChatRecordEncoder(stage, tokenizer)
        with open(data, encoding="utf-8") as f:
            rendered = [encoder(normalize_record(json.loads(line), stage)) for line in f if line.strip()]
        texts = [t for segments, _, _ in rendered for t in segments]
        n_records = len(rendered)
        print(f"data: {' + '.join(CHAT_SAMPLES[stage])} x {repeats} = {os.path.getsize(data) / 1e6:.1f} MB, "
              f"{n_records:,} {stage} records ({len(texts):,} rendered texts: every stored form), "
              f"{os.cpu_count()} CPUs")
        backend = tokenizer._tok
        backend.encode_batch(texts[:1000], add_special_tokens=False)  # warm up the thread pool
        t0 = time.perf_counter()
        n_raw = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
        dt = time.perf_counter() - t0
        out["raw_encode_batch_tok_s"], out["raw_encode_batch_rec_s"] = n_raw / dt, n_records / dt
        print(f"raw tokenizers encode_batch (texts already rendered, Rust threads): {n_raw / dt:,.0f} tokens/s, "
              f"{n_records / dt:,.0f} records/s ({n_raw:,} tokens)")
        del texts, rendered
        target = os.path.join(tmp, "prepared")
        t0 = time.perf_counter()
        meta = prepare_chat(stage, data, target, tokenizer, workers=workers, chunk_lines=chunk_lines, progress=False)
        dt = time.perf_counter() - t0
        assert meta["tokens"] == n_raw, (meta["tokens"], n_raw)
        out["prepare_tok_s"], out["prepare_rec_s"] = meta["tokens"] / dt, meta["documents"] / dt
        print(f"prepare_data --stage {stage} --workers {workers} (end to end: read, parse, validate, render, "
              f"encode, write): {meta['tokens'] / dt:,.0f} tokens/s = {meta['tokens'] / dt / out['raw_encode_batch_tok_s']:.0%} "
              f"of raw encode_batch, {meta['documents'] / dt:,.0f} records/s ({dt:.2f} s)")
        augment = _CHAT_AUGMENT[stage]
        for kind, path in (("jsonl", data), ("prepared", target)):
            pipe = make_dataset(stage, [path], tokenizer, seq, batch, epochs=None, **augment)
            rate = _batches_per_s(pipe)
            out[f"pipeline_{kind}_batches_s"] = rate
            print(f"pipeline reading {kind} ({stage}, shuffled, batch {batch} x {seq}, {augment or 'no augmentation'}): "
                  f"{rate:,.1f} batches/s")
        print(f"prepared / jsonl pipeline: {out['pipeline_prepared_batches_s'] / out['pipeline_jsonl_batches_s']:.2f}x")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", "--data", dest="data", nargs="+", help="jsonl file(s) of the stage, in order")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory")
    parser.add_argument("--stage", default="pretrain", help="data stage: pretrain, sft (also reason / lora), dpo, "
                        "rlaif, agent")
    parser.add_argument("--check", nargs="+", metavar="FILE", help="validate every line of FILE(s) and report")
    parser.add_argument("--workers", type=int, default=2,
                        help="encoding processes (0: in-process encode_batch on the tokenizers thread pool)")
    parser.add_argument("--chunk-lines", type=int, default=4096, help="lines per chunk (the unit of resuming)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of failing")
    parser.add_argument("--pack", action="store_true", help="record a default packing for the reader")
    parser.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None, help="row length for --pack")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT holds other data")
    parser.add_argument("--bench", action="store_true", help="run the throughput benchmark instead")
    parser.add_argument("--bench-open", action="store_true", help="run the open / index benchmark instead")
    parser.add_argument("--bench-mb", type=float, default=None,
                        help="benchmark data size in MB (default 20 for --bench, 1200 for --bench-open)")
    args = parser.parse_args(argv)
    if args.bench_open:
        bench_open(args.bench_mb or 1200.0, args.workers)
        return 0
    if args.bench and args.stage != "pretrain":
        bench_chat(args.stage, args.bench_mb or 4.0, args.workers, tokenizer_dir=args.tokenizer)
        return 0
    if args.bench:
        bench_data(args.bench_mb or 20.0, args.workers, chunk_lines=args.chunk_lines, tokenizer_dir=args.tokenizer)
        return 0
    if args.check:
        return run_check(args)
    return run_prepare(args)


if __name__ == "__main__":
    sys.exit(main())
