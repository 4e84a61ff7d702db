"""scripts/chat.py and scripts/eval.py on a tiny saved model with the bundled tokenizer's vocabulary."""

import importlib.util
import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from minimind_jax import ModelConfig
    from minimind_jax.checkpoint import save_checkpoint

    cfg = ModelConfig.preset("tiny3", vocab_size=6400)
    path = tmp_path_factory.mktemp("scripts") / "ckpt"
    save_checkpoint(path, cached_params(cfg), cfg)
    return cfg, path


def _answers(out: str) -> list[str]:
    return [line[len("🤖: "):] for line in out.splitlines() if line.startswith("🤖: ")]


def test_chat_prompts_file_history_and_reset(ckpt, tmp_path, capsys):
    cfg, path = ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nAnd then?\n/reset\nHello there\n/exit\nnever asked\n", encoding="utf-8")
    chat = _script("chat")
    assert chat.main(["--ckpt", str(path), "--prompts", str(prompts), "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("👤: ") == 5 and "never asked" not in out  # /exit stops reading the file
    answers = _answers(out)
    assert len(answers) == 3
    assert answers[0] == answers[2]  # after /reset the same message gets the same greedy reply


def test_chat_session_sends_the_history(ckpt):

    from minimind_jax.generate import Generator, tokenizer_for

    cfg, path = ckpt
    chat = _script("chat")
    args = chat.build_parser().parse_args(["--ckpt", str(path), "--greedy", "--max-new-tokens", "6"])
    tok = tokenizer_for(None)


    session = chat.ChatSession(Generator(cached_params(cfg), cfg), tok, args, out=io.StringIO())
    first = session.ask("Hi")
    ids = session._prompt_ids("Again")
    text = tok.decode(ids)
    assert "Hi" in text and "Again" in text and text.count("<|im_start|>user") == 2
    assert len(session.history) == 2 and session.history[1] == {"role": "assistant", "content": first}
    args.history = 0
    session.reset()
    assert tok.decode(session._prompt_ids("Again")).count("<|im_start|>user") == 1
    pre = chat.ChatSession(Generator(cached_params(cfg), cfg), tok,
                           chat.build_parser().parse_args(["--ckpt", "x", "--model_mode", "pretrain"]),
                           out=io.StringIO())
    assert pre._prompt_ids("Once upon") == [tok.bos_token_id] + tok.encode("Once upon", add_special_tokens=False)


def test_eval_loss_counts_every_record(ckpt, tmp_path, capsys):
    from minimind_jax.data.jsonl import JsonlSource
    from minimind_jax.data.pipeline import make_transform
    from minimind_jax.model.transformer import MiniMindLM
    from minimind_jax.tokenizer import load_tokenizer
    from minimind_jax.training.stages import token_cross_entropy

    cfg, path = ckpt
    data = ROOT / "data" / "sample" / "sft.jsonl"
    report = tmp_path / "eval.json"
    ev = _script("eval")
    # 5 records in batches of 2: the last batch is padded, not dropped
    assert ev.main(["--ckpt", str(path), "--data", str(data), "--max_seq_len", "64", "--batch_size", "2",
                    "--max-records", "5", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["stage"] == "sft" and result["records"] == 5
    tok = load_tokenizer()
    transform = make_transform("sft", tok, 64)
    source = JsonlSource(str(data), "sft")
    model = MiniMindLM(cfg)
    total, count = 0.0, 0
    for i in range(5):
        arrays = transform(source[i], None).arrays
        losses, mask = token_cross_entropy(
            model.apply({"params": cached_params(cfg)}, jnp.asarray(arrays["input_ids"])[None]).logits,
            jnp.asarray(arrays["labels"])[None])
        total, count = total + float(jnp.sum(losses)), count + int(jnp.sum(mask))
    assert result["tokens"] == count
    np.testing.assert_allclose(result["loss"], total / count, rtol=1e-5)
    assert f"loss {total / count:.4f}" in capsys.readouterr().out


def test_eval_suite_and_errors(ckpt, tmp_path, capsys):
    cfg, path = ckpt
    prompts = tmp_path / "q.txt"
    prompts.write_text("What is 1+1?\nName a color.\n", encoding="utf-8")
    ev = _script("eval")
    report = tmp_path / "suite.json"
    assert ev.main(["--ckpt", str(path), "--suite", "--prompts", str(prompts), "--greedy", "--max-new-tokens", "5",
                    "--json", str(report)]) == 0
    suite = json.loads(report.read_text())["suite"]
    assert [s["prompt"] for s in suite] == ["What is 1+1?", "Name a color."]
    assert all(1 <= s["tokens"] <= 5 for s in suite)
    captured = capsys.readouterr()
    assert len(_answers(captured.out)) == 2 and "100%" in captured.err.splitlines()[-2]  # the bar ends full
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n', encoding="utf-8")
    assert ev.main(["--ckpt", str(path), "--data", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert ev.main(["--ckpt", str(path)]) == 2


def test_eval_holdout_scores_the_last_records(ckpt, tmp_path):
    cfg, path = ckpt
    data = str(ROOT / "data" / "sample" / "pretrain.jsonl")
    ev = _script("eval")
    assert list(ev.record_range(10, 0, 0.2)) == [8, 9] and list(ev.record_range(10, 4, 0.5)) == [2, 3]
    lines = open(data, encoding="utf-8").read().splitlines()[2:4]
    last_two = tmp_path / "last_two.jsonl"
    last_two.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reports = [tmp_path / "held.json", tmp_path / "direct.json"]
    assert ev.main(["--ckpt", str(path), "--data", data, "--max-records", "4", "--holdout", "0.5", "--max_seq_len",
                    "64", "--json", str(reports[0])]) == 0
    assert ev.main(["--ckpt", str(path), "--data", str(last_two), "--max_seq_len", "64", "--json",
                    str(reports[1])]) == 0
    held, direct = (json.loads(r.read_text()) for r in reports)
    assert held["records"] == 2 and held["tokens"] == direct["tokens"]
    np.testing.assert_allclose(held["loss"], direct["loss"], rtol=1e-6)
    assert ev.main(["--ckpt", str(path), "--data", data, "--holdout", "1.5"]) == 2


def test_eval_tasks_runs_lm_eval_offline(ckpt, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    cfg, path = ckpt
    ev = _script("eval")
    report = tmp_path / "tasks.json"
    assert ev.main(["--ckpt", str(path), "--tasks", "minimind_arc", "--limit", "4", "--json", str(report)]) == 0
    arc = json.loads(report.read_text())["tasks"]["minimind_arc"]
    assert 0.0 <= arc["acc,none"] <= 1.0 and "acc_norm,none" in arc
    assert "minimind_arc" in capsys.readouterr().out
    assert ev.main(["--ckpt", str(path), "--tasks", "no_such_task"]) == 2
    assert "unknown task no_such_task" in capsys.readouterr().err


class _Bar:
    def __init__(self):
        self.n, self.moves = 0, []

    def update(self, k):
        self.n += k
        self.moves.append(k)


def test_eval_suite_bar_counts_the_work_not_the_steps():
    ev = _script("eval")
    bar = _Bar()
    update = ev.suite_progress(bar, rows=3, limit=6, eos=[2])
    # row 0 ends on eos at its 2nd token, row 1 at the limit, row 2 on eos at its 4th; the batch stops at step 6
    steps = [[[5], [7], [9]], [[2], [7], [9]], [[], [7], [9]], [[], [7], [2]], [[], [7], []], [[], [7], []]]
    for new in steps:
        update(new)
    assert bar.n == 3 * 6 and min(bar.moves) > 0  # full when the batch ends, never backwards
    bar2 = _Bar()
    update = ev.suite_progress(bar2, rows=2, limit=256, eos=[2])
    update([[5], [6]])
    update([[2], [2]])  # every answer ended at step 2 of 256: the bar is full, not at 1 %
    assert bar2.n == 2 * 256


def _run_dir(tmp_path, cfg, data, step, **train):
    """A training run's directory as the loop leaves it: RUN/weights (its manifest records the step) and
    RUN/train_config.yaml."""
    from minimind_jax.checkpoint import save_checkpoint
    from minimind_jax.training import config as tconfig

    run = tmp_path / "run"
    save_checkpoint(run / "weights", cached_params(cfg), cfg, source={"stage": "pretrain", "step": step})
    settings = {"stage": "pretrain", "data_path": [str(data)], "batch_size": 2, "accumulation_steps": 1,
                "max_seq_len": 64, **train}
    tconfig.dump_yaml(tconfig.from_dict(settings), run / "train_config.yaml")
    return run / "weights"


def test_eval_read_order_is_the_training_pipelines(tmp_path):
    from minimind_jax.data import make_dataset
    from minimind_jax.tokenizer import load_tokenizer

    ev = _script("eval")
    data = tmp_path / "texts.jsonl"
    texts = [f"record number {i} " + "abc" * i for i in range(12)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = load_tokenizer()
    for seed, shuffle in ((7, True), (42, True), (0, False)):
        pipeline = make_dataset("pretrain", str(data), tok, 64, 2, seed=seed, shuffle=shuffle)
        seen = []
        for batch in pipeline:
            for row in batch["input_ids"]:
                body = [int(t) for t in row if t not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)]
                seen.append(texts.index(tok.decode(body)))
        assert seen == ev.read_order(12, seed, shuffle)


def test_eval_unseen_scores_the_records_the_run_did_not_read(ckpt, tmp_path, capsys):
    cfg, _ = ckpt
    ev = _script("eval")
    data = ROOT / "data" / "sample" / "pretrain.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()[:10]
    ten = tmp_path / "ten.jsonl"
    ten.write_text("\n".join(lines) + "\n", encoding="utf-8")
    weights = _run_dir(tmp_path, cfg, ten, step=3, seed=5)  # 3 steps of 2 records: 6 read, 4 unseen
    unseen = sorted(ev.read_order(10, 5)[6:])
    assert ev.unseen_records(*ev.read_run(str(weights)), [str(ten)], 10) == unseen
    direct = tmp_path / "unseen.jsonl"
    direct.write_text("\n".join(lines[i] for i in unseen) + "\n", encoding="utf-8")
    reports = [tmp_path / "unseen.json", tmp_path / "direct.json"]
    assert ev.main(["--ckpt", str(weights), "--data", str(ten), "--unseen", "--json", str(reports[0])]) == 0
    assert "4 records unseen by the run" in capsys.readouterr().out
    assert ev.main(["--ckpt", str(weights), "--data", str(direct), "--max_seq_len", "64", "--json",
                    str(reports[1])]) == 0
    held, want = (json.loads(r.read_text()) for r in reports)
    assert held["records"] == 4 and held["unseen"] and held["tokens"] == want["tokens"]
    assert held["max_seq_len"] == 64  # the run's, not the default 512
    np.testing.assert_allclose(held["loss"], want["loss"], rtol=1e-6)
    capsys.readouterr()
    for argv, message in (([str(data)], "the run trained on"), ([str(ten), "--holdout", "0.5"], "not both")):
        assert ev.main(["--ckpt", str(weights), "--unseen", "--data", *argv]) == 2
        assert message in capsys.readouterr().err
    every = _run_dir(tmp_path / "b", cfg, ten, step=5)
    assert ev.main(["--ckpt", str(every), "--data", str(ten), "--unseen"]) == 2
    assert "read every record" in capsys.readouterr().err
    assert ev.main(["--ckpt", str(ckpt[1]), "--data", str(ten), "--unseen"]) == 2
    assert "train_config.yaml not found" in capsys.readouterr().err


def test_eval_dpo_rewards_against_a_reference(ckpt, tmp_path, capsys):
    import jax

    from minimind_jax.checkpoint import save_checkpoint
    from minimind_jax.data.jsonl import JsonlSource
    from minimind_jax.data.pipeline import make_transform
    from minimind_jax.model.transformer import MiniMindLM
    from minimind_jax.tokenizer import load_tokenizer

    cfg, ref_path = ckpt
    ref = cached_params(cfg)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(ref))))
    moved = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), ref)
    path = save_checkpoint(tmp_path / "dpo", moved, cfg)
    data = ROOT / "data" / "sample" / "dpo.jsonl"
    ev, report = _script("eval"), tmp_path / "dpo.json"
    args = ["--data", str(data), "--max_seq_len", "64", "--batch_size", "4", "--max-records", "6", "--beta", "0.5"]
    assert ev.main(["--ckpt", str(path), "--reference", str(ref_path), *args, "--json", str(report)]) == 0
    got = json.loads(report.read_text())

    # reference: log-softmax of the full logits, summed over the trained labels, per reply (numpy)
    model, tok = MiniMindLM(cfg), load_tokenizer()
    transform, source = make_transform("dpo", tok, 64), JsonlSource(str(data), "dpo")

    def seq_logp(params, ids, labels):
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)[None]).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        logp, targets = logp[:-1], labels[1:]  # position t predicts label t + 1
        trained = targets != -100
        return float(logp[trained, targets[trained]].sum())

    margins = []
    for i in range(6):
        a = transform(source[i], None).arrays
        chosen = [seq_logp(p, a["chosen_input_ids"], a["chosen_labels"]) for p in (moved, ref)]
        rejected = [seq_logp(p, a["rejected_input_ids"], a["rejected_labels"]) for p in (moved, ref)]
        margins.append(0.5 * (chosen[0] - chosen[1]) - 0.5 * (rejected[0] - rejected[1]))
    margins = np.array(margins)
    np.testing.assert_allclose(got["reward_margin"], margins.mean(), rtol=1e-4, atol=1e-4)
    assert got["reward_accuracy"] == np.mean(margins > 0)
    assert "reward accuracy" in capsys.readouterr().out
    # the reference against itself: every margin exactly 0, so no pair is won
    assert ev.main(["--ckpt", str(ref_path), "--reference", str(ref_path), *args, "--json", str(report)]) == 0
    same = json.loads(report.read_text())
    assert same["reward_margin"] == 0.0 and same["reward_accuracy"] == 0.0
    # --reference on non-pair data is an error naming the format
    sft = ROOT / "data" / "sample" / "sft.jsonl"
    assert ev.main(["--ckpt", str(path), "--reference", str(ref_path), "--data", str(sft), "--max-records", "2"]) == 2
    assert "--reference needs DPO pairs" in capsys.readouterr().err


def test_eval_suite_counts_the_reasoning_tags(ckpt, tmp_path, capsys):
    cfg, path = ckpt
    ev, report = _script("eval"), tmp_path / "suite.json"
    prompts = tmp_path / "q.txt"
    prompts.write_text("What is 1+1?\nName a color.\n", encoding="utf-8")
    assert ev.main(["--ckpt", str(path), "--suite", "--think", "--prompts", str(prompts), "--greedy",
                    "--max-new-tokens", "4", "--json", str(report)]) == 0
    suite = json.loads(report.read_text())["suite"]
    held = sum(s["tag_structure"] for s in suite)
    assert f"suite: {held} of 2 replies hold the reasoning tag structure" in capsys.readouterr().out
    assert ev.TAG_STRUCTURE.search("x</think>\n\n<answer>2</answer>") and not ev.TAG_STRUCTURE.search("<answer>2")
