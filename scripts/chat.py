"""Chat with a checkpoint in the terminal (this project's checkpoint directory, or anything the converter reads).

    python scripts/chat.py --ckpt out/quickstart/sft_128/weights
    python scripts/chat.py --ckpt MiniMind2/ --think                 # minimind-3: let the model reason first
    python scripts/chat.py --ckpt out/quickstart/pretrain_128/weights --model_mode pretrain
    python scripts/chat.py --ckpt ... --prompts questions.txt        # non-interactive: one message per line

Multi-turn: earlier turns are sent back through the chat template (``--history N`` keeps the last N turns;
0 keeps them all, as long as they fit the model). The reply streams as it is generated; ``<think>`` reasoning is
shown apart from the answer. Commands: ``/reset`` forgets the conversation, ``/exit`` (or ``/quit``, Ctrl-D)
leaves. ``--model_mode pretrain`` (MiniMind's eval: a pretrained model) continues the text instead: the bos
token, then the message, no template and no history.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"chat": "chat", "pretrain": "pretrain", "0": "pretrain", "1": "chat"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or file (anything the converter reads)")
    p.add_argument("--model_mode", "--model-mode", default="chat", choices=sorted(MODES),
                   help="chat (the chat template, multi-turn) or pretrain (plain continuation); 1 / 0 also work")
    p.add_argument("--prompts", default=None, help="a text file: one user message per line (/reset allowed)")
    p.add_argument("--system", default=None, help="a system message for every conversation")
    p.add_argument("--history", type=int, default=0, help="earlier turns to keep (0 = all that fit)")
    p.add_argument("--think", action="store_true", help="open a <think> block in the generation prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="turn i samples with seed + i (reproducible sessions)")
    p.add_argument("--policy", default="fp32", choices=["fp32", "bf16", "bf16-params"])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's, else bundled)")
    p.add_argument("--show-speed", action="store_true", help="print tokens/s after each reply")
    return p


class Style:
    def __init__(self, enabled: bool):
        self.dim = "\033[2m" if enabled else ""
        self.bold = "\033[1m" if enabled else ""
        self.reset = "\033[0m" if enabled else ""


class ChatSession:
    """A conversation with one model: builds each prompt, streams the reply, keeps the history."""

    def __init__(self, gen, tok, args, out=sys.stdout):
        from minimind_jax.generate import SamplingParams

        self.gen, self.tok, self.args, self.out = gen, tok, args, out
        self.mode = MODES[args.model_mode]
        self.history: list[dict] = []
        self.turn = 0
        self.style = Style(out.isatty() and os.environ.get("NO_COLOR") is None)
        self.sampling = lambda seed: SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=seed)
        SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,  # validate up front
                       repetition_penalty=args.repetition_penalty)

    def reset(self) -> None:
        self.history = []

    def _prompt_ids(self, message: str) -> list[int]:
        if self.mode == "pretrain":
            return [self.tok.bos_token_id] + self.tok.encode(message, add_special_tokens=False)
        limit = self.gen.config.max_position_embeddings - self.args.max_new_tokens
        turns = self.history[-2 * self.args.history:] if self.args.history else self.history
        while True:
            messages = ([{"role": "system", "content": self.args.system}] if self.args.system else []) + turns + [
                {"role": "user", "content": message}]
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               open_thinking=True if self.args.think else None,
                                               sanitize_control_tokens=True)
            if len(ids) <= limit or not turns:
                return ids
            turns = turns[2:]  # drop the oldest exchange until the prompt fits

    def ask(self, message: str) -> str:
        """Answer one user message (printing it as it streams); returns the answer without the reasoning."""
        from minimind_jax.chat_format import ReasoningSplitter, prompt_opens_reasoning
        from minimind_jax.generate import TextStream

        ids = self._prompt_ids(message)
        if len(ids) + self.args.max_new_tokens > self.gen.config.max_position_embeddings:
            raise ValueError(f"the message is too long: {len(ids)} tokens + {self.args.max_new_tokens} new tokens "
                             f"exceed the model's {self.gen.config.max_position_embeddings} positions")
        text = TextStream(self.tok, skip_special_tokens=True)
        chat = self.mode == "chat"
        splitter = ReasoningSplitter(start_in_reasoning=chat and prompt_opens_reasoning(self.tok.decode(ids)))
        answer, in_reasoning, n = [], False, 0
        st = self.style
        self.out.write(f"{st.bold}🤖:{st.reset} ")
        t0 = time.perf_counter()

        def show(delta: str) -> None:
            nonlocal in_reasoning
            reasoning, content = splitter.feed(delta) if chat else ("", delta)
            if reasoning:
                if not in_reasoning:
                    self.out.write(f"{st.dim}[think] ")
                    in_reasoning = True
                self.out.write(reasoning)
            if content:
                if in_reasoning:
                    self.out.write(f"{st.reset}\n")
                    in_reasoning = False
                self.out.write(content)
                answer.append(content)
            self.out.flush()

        for new in self.gen.stream([ids], self.args.max_new_tokens, self.sampling(self.args.seed + self.turn)):
            n += len(new[0])
            show(text.push(new[0]))
        show(text.flush())
        if chat:
            reasoning, content = splitter.finish()
            if reasoning:
                self.out.write(reasoning)
            if in_reasoning or reasoning:
                self.out.write(st.reset + ("\n" if content else ""))
            if content:
                self.out.write(content)
                answer.append(content)
        seconds = time.perf_counter() - t0
        self.out.write("\n")
        if self.args.show_speed:
            self.out.write(f"{st.dim}[{n} tokens, {n / seconds:.1f} tokens/s]{st.reset}\n")
        self.out.flush()
        reply = "".join(answer).strip()
        if chat:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        self.turn += 1
        return reply


def _messages(args):
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    print(f"👤: {line}")
                    yield line
        return
    while True:
        try:
            yield input("👤: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minimind_jax import weights
    from minimind_jax.generate import Generator, default_eos_ids, tokenizer_for

    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.prompts and not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"--prompts: no such file: {args.prompts}")
        config, params = weights.load(args.ckpt)
        tok = tokenizer_for(args.ckpt, args.tokenizer)
        gen = Generator(params, config, args.policy, eos_ids=default_eos_ids(config, tok))
        session = ChatSession(gen, tok, args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.ckpt}: {config.generation}, hidden {config.hidden_size}, {config.num_hidden_layers} layers"
          f"{', MoE' if config.use_moe else ''}; mode {session.mode}. /reset forgets, /exit leaves.")
    for message in _messages(args):
        command = message.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if not message.strip():
            continue
        try:
            session.ask(message)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
