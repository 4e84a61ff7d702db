"""Evaluate a checkpoint: mean loss and perplexity on a jsonl file, and/or answers to a fixed prompt suite.

    python scripts/eval.py --ckpt out/quickstart/pretrain_128/weights --data data/sample/pretrain.jsonl
    python scripts/eval.py --ckpt out/quickstart/sft_128/weights --data data/sample/sft.jsonl --suite
    python scripts/eval.py --ckpt MiniMind2/ --suite --greedy                 # MiniMind's eval: fixed questions
    python scripts/eval.py --ckpt ... --suite --prompts my_questions.txt --model_mode pretrain
    python scripts/eval.py --ckpt out/quickstart/pretrain_128/weights --data data/sample/pretrain.jsonl --unseen
    python scripts/eval.py --ckpt ... --data data/sample/pretrain.jsonl --holdout 0.1   # the last 10 % of records
    python scripts/eval.py --ckpt ... --tasks minimind_ceval,minimind_cmmlu,minimind_arc   # lm-eval, offline samples
    python scripts/eval.py --ckpt ... --tasks arc_easy,piqa --limit 100                   # lm-eval tasks (hub)
    python scripts/eval.py --ckpt out/quickstart/dpo_128/weights --data data/sample/dpo.jsonl \
        --reference out/quickstart/sft_128/weights          # DPO reward accuracy / margin against the reference
    python scripts/eval.py --ckpt out/quickstart/reason_128/weights --suite --think --greedy --prompts FILE

``--data`` takes any of MiniMind's formats (pretrain ``{"text"}``, SFT / reasoning ``{"conversations"}``, DPO
``{"chosen", "rejected"}``: the loss is on the chosen replies), detected from the first record or given with
``--stage``. With ``--reference CKPT`` DPO pairs also give the DPO implicit rewards ``beta * (log pi - log ref)``
of each reply (sequence log-prob sums over the assistant tokens, ``--beta``, default 0.15 as training): the
reward accuracy (the fraction of pairs whose chosen reward beats the rejected one) and the mean margin. The loss is the next-token cross-entropy over the trained tokens (the whole text for pretrain, the
assistant's replies for chat data), exactly as training computes it; every record counts (the last batch is
padded, not dropped). ``--unseen`` scores only the records the checkpoint's training run did not read: the run
(``RUN/weights`` with ``RUN/train_config.yaml``) read the first ``step x accumulation_steps x batch_size`` records
of its seeded shuffle order (the data pipeline's: grain's shuffle of the record indices with the run's ``seed``,
identity with ``shuffle: false``), so the others are held out, as long as that is less than one epoch (a
single-process run; ``--data`` must be the run's ``data_path``; records are cut at the run's ``max_seq_len``
unless ``--max_seq_len`` is given). The quickstart pretrain run reads 2,400 of the
4,000 sample records (150 steps of 16), leaving 1,600 unseen. ``--holdout F`` scores the last fraction F of the
records instead (held out only if training did not read them).

``--tasks`` runs lm-evaluation-harness tasks with the ``minimind-jax`` model (the ``eval`` extra): the shipped
offline tasks (C-Eval-, CMMLU- and ARC-style multiple choice on the jsonl in ``--task-data``), a task YAML file,
or any task name lm-eval knows. ``--suite`` answers the prompts in one batch (MiniMind's eval questions by
default); its progress bar counts each answer's share of ``prompts x max_new_tokens``. With ``--think`` it
also counts the replies that hold the reasoning tag structure (``</think>``, then ``<answer>...</answer>``).
"""

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

# a reasoning reply's tags: the thinking closed, then an answer opened and closed
TAG_STRUCTURE = re.compile(r"</think>\s*<answer>.*?</answer>", re.DOTALL)
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
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None,
                   help="tokens per record for --data (default 512; with --unseen the run's max_seq_len)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--max-records", type=int, default=0, help="evaluate only the first N records (0 = all)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="score only the last FRACTION of the --data records (0 = all), e.g. 0.1")
    p.add_argument("--unseen", action="store_true",
                   help="score only the --data records the checkpoint's training run did not read (RUN/weights)")
    p.add_argument("--reference", default=None,
                   help="DPO data: the reference checkpoint (the DPO run's start) for the reward accuracy / margin")
    p.add_argument("--beta", type=float, default=0.15, help="--reference: the DPO beta of the rewards")
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


def read_order(total: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order in which a single-process training run reads ``total`` records in its first epoch: the data
    pipeline's ``grain.MapDataset.shuffle(seed)`` of the record indices (minimind_jax/data/pipeline.py)."""
    import grain

    return list(grain.MapDataset.range(total).shuffle(seed=seed)) if shuffle else list(range(total))


def read_run(ckpt: str) -> tuple[dict, int]:
    """The settings (``RUN/train_config.yaml``) and the step of the training run whose exported weights are
    ``ckpt`` (``RUN/weights``; its manifest records the step)."""
    import yaml

    from minimind_jax.checkpoint import CheckpointError, read_manifest

    run_config = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "train_config.yaml")
    if not os.path.isfile(run_config):
        raise ValueError(f"--unseen: {run_config} not found: give the weights of a training run (RUN/weights)")
    with open(run_config, encoding="utf-8") as f:
        run = yaml.safe_load(f) or {}
    try:
        source = read_manifest(ckpt).get("source")
    except CheckpointError as e:
        raise ValueError(f"--unseen: {e}") from None
    step = source.get("step") if isinstance(source, dict) else None
    if not isinstance(run, dict) or not isinstance(step, int):
        raise ValueError(f"--unseen: {ckpt}: not the weights of a training run (no step in its manifest)")
    return run, step


def unseen_records(run: dict, step: int, data: list[str], total: int) -> list[int]:
    """The indices (in file order) of the ``total`` records of ``data`` that the training run with settings ``run``
    had not read by ``step``."""
    trained = run.get("data_path") or []
    trained = [trained] if isinstance(trained, str) else trained
    if [os.path.realpath(p) for p in trained] != [os.path.realpath(p) for p in data]:
        raise ValueError(f"--unseen: the run trained on {', '.join(map(str, trained))}, not {', '.join(data)}")
    read = step * int(run.get("accumulation_steps", 1)) * int(run.get("batch_size", 1))
    if read >= total:
        raise ValueError(f"--unseen: the run read every record ({step} steps of {read // max(step, 1)} records, "
                         f"{total} records): none is held out")
    return sorted(read_order(total, int(run.get("seed", 42)), bool(run.get("shuffle", True)))[read:])


def select_records(args, run: dict, step: int, total: int) -> list[int]:
    """The --data records to score: --unseen, --holdout and --max-records applied."""
    if not args.unseen:
        return list(record_range(total, args.max_records, args.holdout))
    if args.holdout:
        raise ValueError("give --unseen or --holdout, not both")
    records = unseen_records(run, step, args.data, total)
    return records[:args.max_records] if args.max_records else records


def run_data(args, params, config, policy, tok) -> dict:
    """Loss and perplexity of the --data records, printed; the figures for --json."""
    from minimind_jax.data.jsonl import JsonlSource

    stages = {p: (detect_stage(p) if args.stage == "auto" else args.stage) for p in args.data}
    if len(set(stages.values())) > 1:
        raise ValueError(f"the --data files hold different formats: {stages}; evaluate them separately")
    stage = next(iter(stages.values()))
    source = JsonlSource(args.data, stage)
    run, step = read_run(args.ckpt) if args.unseen else ({}, 0)
    max_seq_len = args.max_seq_len or int(run.get("max_seq_len", 512))  # --unseen: the run's, unless given
    if max_seq_len < 2:
        raise ValueError("--max_seq_len must be >= 2")
    records = select_records(args, run, step, len(source))
    loss, tokens = evaluate_loss(params, config, policy, tok, source, records, max_seq_len, args.batch_size)
    ppl = math.exp(min(loss, 700.0))
    which = " unseen by the run" if args.unseen else ""
    print(f"{', '.join(args.data)} ({stage}, {len(records)} records{which}, {tokens} trained tokens, "
          f"max_seq_len {max_seq_len}): loss {loss:.4f}, perplexity {ppl:.2f}")
    out = dict(data=args.data, stage=stage, records=len(records), tokens=tokens, loss=loss, perplexity=ppl,
               max_seq_len=max_seq_len, holdout=args.holdout, unseen=args.unseen)
    if args.reference:
        if stage != "dpo":
            raise ValueError(f"--reference needs DPO pairs; the --data files hold {stage} records")
        from minimind_jax import weights

        ref_config, ref_params = weights.load(args.reference, what="--reference")
        rewards = evaluate_dpo((params, config), (ref_params, ref_config), policy, tok, source, records,
                               max_seq_len, args.batch_size, args.beta)
        print(f"DPO against {args.reference} (beta {args.beta}, {len(records)} pairs): reward accuracy "
              f"{rewards['reward_accuracy']:.3f}, reward margin {rewards['reward_margin']:.4f}")
        out.update(rewards)
    return out


def evaluate_loss(params, config, policy, tok, source, records, max_seq_len, batch_size):
    """(mean loss over trained tokens, trained tokens) of ``source``'s ``records``, batch by batch with a bar."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from minimind_jax.data.pipeline import make_transform
    from minimind_jax.data.samples import IGNORE_INDEX
    from minimind_jax.model.transformer import MiniMindLM
    from minimind_jax.training.stages import token_cross_entropy

    stage = source.stage
    transform = make_transform(stage, tok, max_seq_len)
    ids_key, labels_key = ("chosen_input_ids", "chosen_labels") if stage == "dpo" else ("input_ids", "labels")
    model = MiniMindLM(config, policy)

    @jax.jit
    def batch_loss(p, ids, labels):
        losses, mask = token_cross_entropy(model.apply({"params": p}, ids).logits, labels)
        return jnp.sum(losses), jnp.sum(mask)

    total, tokens = 0.0, 0
    params = jax.device_put(policy.cast_to_param(params))
    with tqdm(total=len(records), desc="loss", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            ids = np.zeros((batch_size, max_seq_len), np.int32)
            labels = np.full((batch_size, max_seq_len), IGNORE_INDEX, np.int32)  # padding rows train nothing
            for row, index in enumerate(batch):
                arrays = transform(source[index], None).arrays
                ids[row], labels[row] = arrays[ids_key], arrays[labels_key]
            s, m = batch_loss(params, ids, labels)
            total, tokens = total + float(s), tokens + int(m)
            bar.update(len(batch))
            bar.set_postfix(loss=f"{total / max(tokens, 1):.4f}")
    return total / max(tokens, 1), tokens


def evaluate_dpo(model, reference, policy, tok, source, records, max_seq_len, batch_size, beta) -> dict:
    """DPO reward accuracy and mean margin of ``model`` = (params, config) over ``reference`` on the pairs."""
    import jax
    import numpy as np

    from minimind_jax.data.pipeline import make_transform
    from minimind_jax.model.transformer import MiniMindLM
    from minimind_jax.training.losses import dpo_terms, sequence_log_probs

    transform = make_transform("dpo", tok, max_seq_len)

    def log_probs_fn(config):
        net = MiniMindLM(config, policy)
        return jax.jit(lambda p, ids, labels: sequence_log_probs(net.apply({"params": p}, ids).logits, labels))

    runs = [(jax.device_put(policy.cast_to_param(p)), log_probs_fn(c)) for p, c in (model, reference)]
    margins = []
    for start in range(0, len(records), batch_size):
        rows = [transform(source[i], None).arrays for i in records[start:start + batch_size]]
        ids = np.stack([r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows])
        labels = np.stack([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows])
        pi, ref = (np.asarray(fn(p, ids, labels)) for p, fn in runs)
        margins.append(np.asarray(dpo_terms(pi, ref, beta)["margin"]))
    margin = np.concatenate(margins)
    return {"reward_accuracy": float(np.mean(margin > 0)), "reward_margin": float(np.mean(margin))}


def suite_progress(bar, rows: int, limit: int, eos) -> Callable[[list[list[int]]], None]:
    """A ``Generator.generate`` callback moving ``bar`` (total ``rows x limit``) by each row's share of the work:
    its new tokens, and the rest of its ``limit`` when it ends on an eos, so the bar ends full when the batch does
    (counting decode steps against ``limit`` left it part way, e.g. at 22 %, when every answer ended early)."""
    done = [0] * rows
    eos = set(eos)

    def update(new: list[list[int]]) -> None:
        for i, tokens in enumerate(new):
            if tokens and done[i] < limit:
                now = limit if tokens[-1] in eos else min(limit, done[i] + len(tokens))
                bar.update(now - done[i])
                done[i] = now

    return update


def suite_prompts(path: str | None) -> list[str]:
    """The --prompts file's non-blank lines, else :data:`SUITE`."""
    if not path:
        return SUITE
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def run_suite(gen, tok, prompts, args):
    from tqdm import tqdm

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
    t0 = time.perf_counter()
    with tqdm(total=len(ids) * args.max_new_tokens, desc=f"suite ({len(prompts)} prompts, one batch)", unit="tok",
              file=sys.stderr, dynamic_ncols=True) as bar:
        results = gen.generate(ids, args.max_new_tokens, sampling,
                               callback=suite_progress(bar, len(ids), args.max_new_tokens, gen.eos_ids))
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
                        "finish_reason": res.finish_reason, "tag_structure": bool(TAG_STRUCTURE.search(text))})
    n = sum(len(r.tokens) for r in results)
    if chat and args.think:
        held = sum(a["tag_structure"] for a in answers)
        print(f"suite: {held} of {len(answers)} replies hold the reasoning tag structure "
              "(</think>, then <answer>...</answer>)")
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
        if args.batch_size < 1:
            raise ValueError("--batch_size must be >= 1")
        if not os.path.exists(args.ckpt):
            raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or directory")
        if args.data or args.suite:  # --tasks loads the checkpoint itself
            config, params = weights.load(args.ckpt, what="--ckpt")
            tok = tokenizer_for(args.ckpt, args.tokenizer)
            policy = get_policy(args.policy)
        if args.data:
            out.update(run_data(args, params, config, policy, tok))
        if args.suite:
            gen = Generator(params, config, policy, eos_ids=default_eos_ids(config, tok))
            out["suite"] = run_suite(gen, tok, suite_prompts(args.prompts), args)
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
