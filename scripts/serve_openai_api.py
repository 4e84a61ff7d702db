"""Serve a checkpoint through an OpenAI-compatible HTTP API (chat completions, streaming or not).

    python scripts/serve_openai_api.py --ckpt out/quickstart/sft_128/weights
    python scripts/serve_openai_api.py --ckpt MiniMind2/ --policy bf16-params --port 8998 --max-batch 16

Open the printed URL for the chat page, or point any OpenAI client at http://127.0.0.1:8998/v1 (the API
key is not checked; the model is named after the run directory, ``sft_128`` here; another ``model`` name
gets 404 unless --any-model-name is given):

    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sft_128", "messages": [{"role": "user", "content": "你好"}], "stream": true}'

--ckpt is this project's checkpoint directory or anything the converter reads. Requests run on a
continuous-batching engine: --max-batch decode slots over one KV cache of --cache-len tokens per slot; a new
request joins the running decode at the next step. The logic lives in minimind_jax/server.py and engine.py.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A quiet start: no C++ (XLA/TSL) info lines and no absl/libtpu chatter from the TPU probe on CPU/GPU machines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "2")
DEFAULT_CACHE_LEN = 4096  # MiniMind's 32768-token context x 8 slots would preallocate 8 x 32768 cached tokens


def served_name(ckpt: str) -> str:
    """The model id clients see: the run directory's name (``out/quickstart/sft_128/weights`` -> ``sft_128``),
    the checkpoint's own name when it is not a ``weights`` / ``state`` directory inside a run."""
    path = os.path.normpath(os.path.abspath(ckpt))
    base = os.path.basename(path)
    if base in ("weights", "state", "final") or base.startswith("step_"):
        base = os.path.basename(os.path.dirname(path)) or base
    return os.path.splitext(base)[0] or "minimind"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or file (anything the converter reads)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped MiniMind one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--policy", default="fp32", help="precision policy: fp32, bf16, bf16-params, ...")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: most requests decoded together")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV-cache tokens per slot = the longest prompt + reply served (default: the model's "
                        "context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take (then 504)")
    p.add_argument("--warm-up", action="store_true", help="compile every decode shape before serving")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: from --ckpt)")
    p.add_argument("--any-model-name", action="store_true",
                   help="answer requests naming any model (for clients that hard-code one; default: 404)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="new-token limit of a request that sets no max_tokens (capped by the context left)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the model's context less one)")
    # the engine's CHUNK_TOKENS / CHUNK_SCORES (not imported here: the parser loads no jax)
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="a longer prompt is prefilled in chunks of at most this many tokens, between decode steps")
    p.add_argument("--prefill-chunk-scores", type=int, default=512 * 2048,
                   help="most query x column pairs a chunk attends (chunks shrink late in a long prompt); "
                        "raise it on a GPU for faster long prefills, lower it for smoother streaming")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted, in MiB (413 beyond)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.compiler"):  # backend probing at start-up
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import uvicorn

    from minimind_jax.generate import Generator
    from minimind_jax.server import create_app
    from minimind_jax.sse import listening_socket
    from minimind_jax.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

    try:  # a missing, corrupt or foreign checkpoint / tokenizer: one line naming it, not a traceback
        generator = Generator.from_checkpoint(args.ckpt, policy=args.policy)
        tokenizer = load_tokenizer(args.tokenizer or DEFAULT_TOKENIZER_DIR)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or served_name(args.ckpt)
    cache_len = args.cache_len or min(generator.config.max_position_embeddings, DEFAULT_CACHE_LEN)
    try:  # e.g. a tokenizer larger than the model's vocabulary
        app = create_app(generator, tokenizer, name, max_batch=args.max_batch,
                         default_max_tokens=args.default_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                         max_body_bytes=int(args.max_body_mb * 2 ** 20), cache_len=cache_len,
                         max_queue=args.max_queue, request_timeout_s=args.request_timeout, warm_up=args.warm_up,
                         prefill_chunk=args.prefill_chunk, prefill_chunk_scores=args.prefill_chunk_scores,
                         any_model_name=args.any_model_name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # connections get a bounded send buffer, so a client that stops reading its stream is noticed
        sock = listening_socket(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.ckpt} as {name!r} ({generator.config.num_hidden_layers} layers, policy {args.policy}, "
          f"{args.max_batch} slots of {cache_len} tokens) on http://{args.host}:{args.port}/v1", flush=True)
    print(f"chat page: http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
