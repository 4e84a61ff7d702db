"""Generate text from a checkpoint (this project's checkpoint directory, or anything the converter reads).

    python scripts/generate.py --ckpt out/quickstart/pretrain_128/weights --prompt "The sun is"
    python scripts/generate.py --ckpt MiniMind2/ --prompt "你好" --prompt "Hello" --temperature 0.85 --top-p 0.85
    python scripts/generate.py --ckpt model.safetensors --prompt-ids 1,2,3 --greedy --print-ids
    python scripts/generate.py --ckpt out/quickstart/sft_128/weights --chat --prompt "What is JAX?"

Several --prompt run as one left-padded batch. Without --chat the prompt is continued as plain text (MiniMind's
pretrain mode: the bos token, then the prompt); with --chat it is a user message in the chat template, whose
control tokens typed in the text (<|im_start|>, <|im_end|>, ...) are encoded as plain text, not as control tokens.
Sampling is MiniMind's (temperature, top-k, top-p, repetition penalty); --greedy takes the argmax.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or file (anything the converter reads)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=_ids, help="prompt as ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    p.add_argument("--think", action="store_true", help="with --chat: open a <think> block (minimind-3 templates)")
    p.add_argument("--policy", default="fp32", choices=["fp32", "bf16", "bf16-params"])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's, else bundled)")
    p.add_argument("--print-ids", action="store_true",
                   help="print each full id sequence (prompt + new tokens) as space-separated integers")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minimind_jax import weights
    from minimind_jax.generate import (
        Generator,
        SamplingParams,
        TextStream,
        default_eos_ids,
        tokenizer_for,
    )

    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        t0 = time.perf_counter()
        config, params = weights.load(args.ckpt)
        tok = tokenizer_for(args.ckpt, args.tokenizer)
        if args.prompt_ids:
            prompts = args.prompt_ids
        elif args.chat:
            # control tokens typed in a prompt (e.g. <|im_start|>) are encoded as text, as in chat.py and the server
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               open_thinking=args.think if args.think else None, tokenize=True,
                                               sanitize_control_tokens=True)
                       for p in args.prompt]
        else:
            prompts = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in args.prompt]
        gen = Generator(params, config, args.policy, eos_ids=default_eos_ids(config, tok))
        print(f"loaded {args.ckpt} ({config.generation}, hidden {config.hidden_size}, {config.num_hidden_layers} "
              f"layers{', MoE' if config.use_moe else ''}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        stream_text = not args.print_ids and not args.no_stream and len(prompts) == 1
        callback = None
        if stream_text:
            ts = TextStream(tok, skip_special_tokens=True)

            def callback(new):
                print(ts.push(new[0]), end="", flush=True)
        t0 = time.perf_counter()
        results = gen.generate(prompts, args.max_new_tokens, sampling, callback=callback)
        seconds = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stream_text:
        print(ts.flush())
    for k, (prompt, res) in enumerate(zip(prompts, results)):
        if args.print_ids:
            print(" ".join(str(i) for i in list(prompt) + res.tokens))
        elif not stream_text:
            if k:
                print("---")  # between the replies of several prompts
            print(tok.decode(res.tokens, skip_special_tokens=True))
    n = sum(len(r.tokens) for r in results)
    print(f"{n} tokens in {seconds:.2f} s (compile included); finish: "
          f"{', '.join(r.finish_reason for r in results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
