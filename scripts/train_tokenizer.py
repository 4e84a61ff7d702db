#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on MiniMind jsonl data and write a Hugging Face tokenizer directory.

  python scripts/train_tokenizer.py --data data/sample/*.jsonl [--vocab_size 6400] [--min_frequency 2] \\
      [--out out/tokenizer]

The text is taken from every MiniMind format, detected per line: pretrain ``{"text"}``, SFT / reasoning / LoRA
``{"conversations": [...]}`` (every message's ``content`` and ``reasoning_content``, plus ``tool_calls`` as JSON),
DPO ``{"chosen": [...], "rejected": [...]}``.

The tokenizer mirrors MiniMind-3's: no normalizer, a ByteLevel pre-tokenizer (``add_prefix_space=False``), a BPE
model trained with the 256-symbol byte-level initial alphabet, a ByteLevel decoder, no post-processor (nothing is
added on encode), and the same 36 added tokens at ids 0..35 in the same order (``<|endoftext|>`` = pad / unk 0,
``<|im_start|>`` = bos 1, ``<|im_end|>`` = eos 2, ...; ids 0-20 special, 21-35 - ``<tool_call>``, ``<think>``,
buffers - ordinary added tokens). The output directory holds ``tokenizer.json`` and ``tokenizer_config.json``
with our own ChatML chat template (see ``CHAT_TEMPLATE``), which renders the same strings as MiniMind-3's.

Training is deterministic: the same data and settings give a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the shipped tokenizer (minimind_jax/assets/tokenizer) is replaced only when --out names it
DEFAULT_OUT = os.path.join("out", "tokenizer")

# The added tokens of MiniMind-3's tokenizer (jingyaogong/minimind, model/tokenizer_config.json), in id order:
# the first SPECIAL_COUNT are special tokens (skipped by decode(skip_special_tokens=True)), the rest are ordinary
# added tokens (never split, but kept when decoding). Keep this list in sync with MiniMind-3 so checkpoints and
# data stay interchangeable.
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|buffer1|>", "<|buffer2|>", "<|buffer3|>", "<|buffer4|>", "<|buffer5|>", "<|buffer6|>", "<|buffer7|>",
    "<|buffer8|>", "<|buffer9|>",
]
SPECIAL_COUNT = 21  # ids 0..20 are special; <tool_call> (21) onwards are not

BOS, EOS, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 131072  # MiniMind-3's value

# ChatML with MiniMind-3's conventions, written for this project (same renderings as MiniMind-3's template):
# * a first system message (and the tool list, when tools are given) opens the chat; later system messages are
#   ordinary turns;
# * every assistant turn starts with a think block: `reasoning_content` (or the text before `</think>` in the
#   content) inside `<think>\n...\n</think>\n\n`, empty when there is no reasoning;
# * tool calls follow the content as `<tool_call>` JSON blocks; consecutive tool results share one user turn,
#   each inside `<tool_response>`;
# * add_generation_prompt opens an assistant turn with an empty think block, or only `<think>\n` when
#   open_thinking is true (exactly True), so the model writes its reasoning.
# Differences from MiniMind-3's template: a first system message whose content is not a string renders as empty
# (MiniMind-3's raises an error).
CHAT_TEMPLATE = r"""
{%- macro text(m) -%}{{- m.content if m.content is string else '' -}}{%- endmacro -%}
{%- macro turn(role, body) -%}{{- '<|im_start|>' ~ role ~ '\n' ~ body ~ '<|im_end|>\n' -}}{%- endmacro -%}
{%- set opens_with_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
    {%- set tool_lines = namespace(s='') -%}
    {%- for t in tools -%}{%- set tool_lines.s = tool_lines.s ~ '\n' ~ (t | tojson) -%}{%- endfor -%}
    {{- turn('system', (text(messages[0]) ~ '\n\n' if opens_with_system else '')
        ~ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        ~ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' ~ tool_lines.s
        ~ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        ~ '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        ~ '<args-json-object>}\n</tool_call>') -}}
{%- elif opens_with_system -%}
    {{- turn('system', text(messages[0])) -}}
{%- endif -%}
{%- for m in messages -%}
    {%- set body = text(m) -%}
    {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
        {{- turn(m.role, body) -}}
    {%- elif m.role == 'assistant' -%}
        {%- if m.reasoning_content is string -%}
            {%- set thought = m.reasoning_content -%}
        {%- elif '</think>' in body -%}
            {%- set parts = body.split('</think>') -%}
            {%- set thought = parts[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set body = parts[-1].lstrip('\n') -%}
        {%- else -%}
            {%- set thought = '' -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n<think>\n' ~ thought.strip('\n') ~ '\n</think>\n\n' ~ body.lstrip('\n') -}}
        {%- for call in (m.tool_calls or []) -%}
            {%- set f = call.function if call.function else call -%}
            {%- if body or not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- '<tool_call>\n{"name": "' ~ f.name ~ '", "arguments": '
                ~ (f.arguments if f.arguments is string else f.arguments | tojson) ~ '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' ~ body ~ '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' ~ ('<think>\n' if open_thinking is true else '<think>\n\n</think>\n\n') -}}
{%- endif -%}
""".strip()


# ------------------------------------------------------------------------------------------------------------
# Reading the data


def texts_from_record(record: dict) -> Iterator[str]:
    """Every piece of text in one jsonl record of any MiniMind format."""
    if not isinstance(record, dict):
        return
    if isinstance(record.get("text"), str):
        yield record["text"]
    for key in ("conversations", "chosen", "rejected"):
        messages = record.get(key)
        if not isinstance(messages, list):
            continue
        for m in messages:
            if not isinstance(m, dict):
                continue
            for field in ("content", "reasoning_content"):
                if isinstance(m.get(field), str) and m[field]:
                    yield m[field]
            if m.get("tool_calls"):
                yield json.dumps(m["tool_calls"], ensure_ascii=False)


def iter_texts(paths: Sequence[str], progress: bool = True) -> Iterator[str]:
    """The texts of every line of every file, in order, with a tqdm progress bar over the lines."""
    total = None
    if progress:
        total = 0
        for p in paths:
            with open(p, "rb") as f:
                total += sum(1 for _ in f)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=" lines", desc="reading", file=sys.stderr)
    try:
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if bar is not None:
                        bar.update(1)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
                    yield from texts_from_record(record)
    finally:
        if bar is not None:
            bar.close()
    if progress:
        print("read every line; learning the merges ...", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Training and writing


def train(texts: Iterable[str], vocab_size: int = 6400, min_frequency: int = 2, show_progress: bool = True):
    """A trained ``tokenizers.Tokenizer`` with ADDED_TOKENS at ids 0.. (flags as MiniMind-3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(ADDED_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(ADDED_TOKENS) + 256} (added tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=ADDED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    # The trainer registers every added token as special; MiniMind-3's ids 21.. are ordinary added tokens.
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["id"] < SPECIAL_COUNT
        entry["normalized"] = False
    got = [(e["id"], e["content"]) for e in data["added_tokens"]]
    if got != list(enumerate(ADDED_TOKENS)):
        raise RuntimeError(f"added tokens did not land at ids 0..{len(ADDED_TOKENS) - 1}: {got}")
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config(model_max_length: int = MODEL_MAX_LENGTH) -> dict:
    """``tokenizer_config.json``: MiniMind-3's token settings with our chat template."""
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": i < SPECIAL_COUNT}
        for i, t in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDED_TOKENS[1:SPECIAL_COUNT],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok, out_dir: str, model_max_length: int = MODEL_MAX_LENGTH) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(tokenizer_config(model_max_length), f, ensure_ascii=False, indent=2)
        f.write("\n")


def train_files(paths: Sequence[str], out_dir: str, vocab_size: int = 6400, min_frequency: int = 2,
                progress: bool = True, model_max_length: int = MODEL_MAX_LENGTH):
    """Train on the jsonl files and write the tokenizer directory; returns the ``tokenizers.Tokenizer``."""
    # one progress bar: ours counts the lines read (with a total); the trainer's own bars would draw over it,
    # so it runs quiet and a line announces its merge phase (which shows nothing for a while on large files)
    tok = train(iter_texts(paths, progress=progress), vocab_size, min_frequency, show_progress=False)
    save(tok, out_dir, model_max_length)
    return tok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="jsonl files (any MiniMind format)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: out/tokenizer; the shipped one is "
                        "minimind_jax/assets/tokenizer)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--model_max_length", type=int, default=MODEL_MAX_LENGTH)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    tok = train_files(args.data, args.out, args.vocab_size, args.min_frequency, progress=not args.quiet,
                      model_max_length=args.model_max_length)
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
