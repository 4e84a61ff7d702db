"""Evaluate a checkpoint: mean loss and perplexity on a jsonl file, and/or answers to a fixed prompt suite.

    python scripts/eval.py --ckpt out/quickstart/pretrain_128/weights --data data/sample/pretrain.jsonl
    python scripts/eval.py --ckpt out/quickstart/sft_128/weights --data data/sample/sft.jsonl --suite
    python scripts/eval.py --ckpt MiniMind2/ --suite --greedy                 # MiniMind's eval: fixed questions
    python scripts/eval.py --ckpt ... --suite --prompts my_questions.txt --model_mode pretrain
    python scripts/eval.py --ckpt ... --data data/sample/pretrain.jsonl --holdout 0.1   # the last 10 % of records
    python scripts/eval.py --ckpt ... --tasks minimind_ceval,minimind_cmmlu,minimind_arc   # lm-eval, offline samples
    python scripts/eval.py --ckpt ... --tasks arc_easy,piqa --limit 100                   # lm-eval tasks (hub)

``--data`` takes any of MiniMind's formats (pretrain ``{"text"}``, SFT / reasoning ``{"conversations"}``, DPO
``{"chosen", "rejected"}``: the loss is on the chosen replies), detected from the first record or given with
``--stage``. The loss is the next-token cross-entropy over the trained tokens (the whole text for pretrain, the
assistant's replies for chat data), exactly as training computes it; every record counts (the last batch is
padded, not dropped); ``--holdout F`` scores only the last fraction F of the records (hold them out of
training with the same split). ``--tasks`` runs lm-evaluation-harness tasks with the ``minimind-jax`` model
(the ``eval`` extra): the shipped offline tasks (C-Eval-, CMMLU- and ARC-style multiple choice on the jsonl in
``--task-data``), a task YAML file, or any task name lm-eval knows. ``--suite`` answers the prompts in one batch (MiniMind's eval questions by default).
"""

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A fixed suite in the spirit of MiniMind's eval_llm.py: knowledge, reasoning, code, advice, Chinese and English.
SUITE = [
    "你有什么特长？",
    "为什么天空是蓝色的？",
    "请用Python写一个计算斐波那契数列的函数",
    "解释一下“光合作用”的基本过程",
    "如果明天下雨，我应该如何出门？",
    "比较一下猫和狗作为宠物的优缺点",
    "What is machine learning?",
    "Write a short poem about the sea.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or file (anything the converter reads)")
    p.add_argument("--data", action="append", default=[], help="jsonl file(s) for the loss / perplexity")
    p.add_argument("--stage", default="auto", choices=["auto", "pretrain", "sft", "dpo"],
                   help="data format (auto: from the first record's keys)")
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=512)
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--max-records", type=int, default=0, help="evaluate only the first N records (0 = all)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="score only the last FRACTION of the --data records (0 = all), e.g. 0.1")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks: minimind_ceval, minimind_cmmlu, "
                   "minimind_arc (offline), a task .yaml, or lm-eval's names (ceval-valid, cmmlu, arc_easy, piqa, ...)")
    p.add_argument("--task-data", default=os.path.join(ROOT, "data", "sample", "eval"),
                   help="directory of the offline tasks' jsonl (default: the bundled samples)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per prompt")
    p.add_argument("--apply-chat-template", action="store_true", help="lm-eval: prompts through the chat template")
    p.add_argument("--suite", action="store_true", help="answer the prompt suite")
    p.add_argument("--prompts", default=None, help="the suite's prompts: a text file, one per line")
    p.add_argument("--model_mode", "--model-mode", default="chat", choices=["chat", "pretrain", "0", "1"],
                   help="suite prompts through the chat template (chat, 1) or as plain text (pretrain, 0)")
    p.add_argument("--think", action="store_true", help="open a <think> block in the suite's prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="fp32", choices=["fp32", "bf16", "bf16-params"])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's, else bundled)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def detect_stage(path: str) -> str:
    """pretrain / sft / dpo from the keys of the first non-blank record of ``path``."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: a record must be a JSON object")
            if "chosen" in record and "rejected" in record:
                return "dpo"
            if "conversations" in record:
                return "sft"
            if "text" in record:
                return "pretrain"
            raise ValueError(f"{path}:{line_no}: cannot tell the data format from the keys {sorted(record)}; "
                             "expected text (pretrain), conversations (sft) or chosen/rejected (dpo); see --stage")
    raise ValueError(f"{path}: no records")


def record_range(total: int, max_records: int = 0, holdout: float = 0.0) -> range:
    """The records to score: the last ``holdout`` fraction (at least one) of the first ``max_records`` (0 = all)."""
    n = min(max_records, total) if max_records else total
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    return range(n - max(1, round(n * holdout)) if holdout else 0, n)


def evaluate_loss(params, config, policy, tok, paths, stage, max_seq_len, batch_size, max_records=0, holdout=0.0):
    """(mean loss over trained tokens, trained tokens, records) of the files, batch by batch with a progress bar."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from minimind_jax.data.jsonl import JsonlSource
    from minimind_jax.data.pipeline import make_transform
    from minimind_jax.data.samples import IGNORE_INDEX
    from minimind_jax.model.transformer import MiniMindLM
    from minimind_jax.training.stages import token_cross_entropy

    source = JsonlSource(paths, stage)
    transform = make_transform(stage, tok, max_seq_len)
    ids_key, labels_key = ("chosen_input_ids", "chosen_labels") if stage == "dpo" else ("input_ids", "labels")
    model = MiniMindLM(config, policy)

    @jax.jit
    def batch_loss(p, ids, labels):
        losses, mask = token_cross_entropy(model.apply({"params": p}, ids).logits, labels)
        return jnp.sum(losses), jnp.sum(mask)

    records = record_range(len(source), max_records, holdout)
    n = len(records)
    total, tokens = 0.0, 0
    params = jax.device_put(policy.cast_to_param(params))
    with tqdm(total=n, desc="loss", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            ids = np.zeros((batch_size, max_seq_len), np.int32)
            labels = np.full((batch_size, max_seq_len), IGNORE_INDEX, np.int32)  # padding rows train nothing
            for row in range(count):
                arrays = transform(source[records[start + row]], None).arrays
                ids[row], labels[row] = arrays[ids_key], arrays[labels_key]
            s, m = batch_loss(params, ids, labels)
            total, tokens = total + float(s), tokens + int(m)
            bar.update(count)
            bar.set_postfix(loss=f"{total / max(tokens, 1):.4f}")
    return total / max(tokens, 1), tokens, n


def run_suite(gen, tok, prompts, args):
    from minimind_jax.chat_format import split_reasoning
    from minimind_jax.generate import SamplingParams

    chat = args.model_mode in ("chat", "1")
    if chat:
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       open_thinking=True if args.think else None, sanitize_control_tokens=True)
               for p in prompts]
    else:
        ids = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    from tqdm import tqdm

    bar = tqdm(total=args.max_new_tokens, desc=f"suite ({len(prompts)} prompts, one batch)", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    results = gen.generate(ids, args.max_new_tokens, sampling, callback=lambda new: bar.update(1))
    bar.total = bar.n  # every prompt ended before max_new_tokens: the bar ends full, not part way
    bar.refresh()
    bar.close()
    seconds = time.perf_counter() - t0
    answers = []
    for prompt, prompt_ids, res in zip(prompts, ids, results):
        text = tok.decode(res.tokens, skip_special_tokens=True)
        opened = chat and args.think
        reasoning, answer = split_reasoning(text, start_in_reasoning=opened) if chat else (None, text)
        print(f"👤: {prompt}")
        if reasoning:
            print(f"[think] {reasoning}")
        print(f"🤖: {answer.strip()}\n")
        answers.append({"prompt": prompt, "reasoning": reasoning, "answer": answer, "tokens": len(res.tokens),
                        "finish_reason": res.finish_reason})
    n = sum(len(r.tokens) for r in results)
    print(f"suite: {n} tokens in {seconds:.1f} s ({n / seconds:.1f} tokens/s, compile included)", file=sys.stderr)
    return answers


def run_tasks(args) -> dict:
    """lm-eval's results (task -> metric -> value) for ``--tasks``, printed as lm-eval's table."""
    try:
        from lm_eval.utils import make_table

        from minimind_jax.evaluation.harness import MiniMindJaxLM
        from minimind_jax.evaluation.offline import evaluate
    except ImportError as e:
        raise ValueError(f"--tasks needs lm-evaluation-harness: pip install -e '.[eval]' ({e})") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm = MiniMindJaxLM(pretrained=args.ckpt, policy=args.policy, batch_size=args.batch_size, tokenizer=args.tokenizer)
    results = evaluate(lm, tasks, data_dir=args.task_data, limit=args.limit, num_fewshot=args.num_fewshot,
                       apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.data and not args.suite and not args.tasks:
        print("error: nothing to do: give --data FILE, --suite and/or --tasks", file=sys.stderr)
        return 2
    from minimind_jax import weights
    from minimind_jax.generate import Generator, default_eos_ids, tokenizer_for
    from minimind_jax.precision import get_policy

    out = {"ckpt": args.ckpt}
    try:
        for path in args.data:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data: no such file: {path}")
        if args.prompts and not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"--prompts: no such file: {args.prompts}")
        if args.batch_size < 1 or args.max_seq_len < 2:
            raise ValueError("--batch_size must be >= 1 and --max_seq_len >= 2")
        config, params = weights.load(args.ckpt, what="--ckpt")
        tok = tokenizer_for(args.ckpt, args.tokenizer)
        policy = get_policy(args.policy)
        if args.data:
            stages = {p: (detect_stage(p) if args.stage == "auto" else args.stage) for p in args.data}
            if len(set(stages.values())) > 1:
                raise ValueError(f"the --data files hold different formats: {stages}; evaluate them separately")
            stage = next(iter(stages.values()))
            loss, tokens, records = evaluate_loss(params, config, policy, tok, args.data, stage, args.max_seq_len,
                                                  args.batch_size, args.max_records, args.holdout)
            ppl = math.exp(min(loss, 700.0))
            print(f"{', '.join(args.data)} ({stage}, {records} records, {tokens} trained tokens, max_seq_len "
                  f"{args.max_seq_len}): loss {loss:.4f}, perplexity {ppl:.2f}")
            out.update(data=args.data, stage=stage, records=records, tokens=tokens, loss=loss, perplexity=ppl,
                       holdout=args.holdout)
        if args.suite:
            prompts = SUITE
            if args.prompts:
                with open(args.prompts, encoding="utf-8") as f:
                    prompts = [line.strip() for line in f if line.strip()]
            if not prompts:
                raise ValueError(f"{args.prompts}: no prompts")
            gen = Generator(params, config, policy, eos_ids=default_eos_ids(config, tok))
            out["suite"] = run_suite(gen, tok, prompts, args)
        if args.tasks:
            out["tasks"] = run_tasks(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
