"""RL prompt records (MiniMind's rlaif.jsonl / agent_rl.jsonl): validation naming file:line and field, the prompt
= conversations[:-1] with tools parsed, rendering equal to transformers' template on MiniMind-3's tokenizer as
MiniMind's RLAIFDataset / AgentRLDataset render it, and sharded, seeded, resumable iteration."""

import json
import pathlib

import numpy as np
import pytest

from minimind_jax.data import SYSTEM_PROMPTS, DataError
from minimind_jax.data.rl_prompts import RLPromptSource, iter_rl_prompts, render_rl_prompt
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "minimind3_tokenizer"


def write(tmp_path, records, name="rl.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("record, kind, match", [
    ({"conversations": [{"role": "user", "content": "hi"}]}, "rlaif", "assistant message to generate"),
    ({"conversations": [{"role": "assistant", "content": ""}]}, "rlaif", "no prompt before"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "agent",
     "missing the field 'gt'"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": [{}]},
     "agent", r"'gt\[0\]' must be a string or a number"),
    ({"conversations": [{"role": "system", "content": "", "tools": "[{bad"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": ""}], "gt": ["1"]}, "agent",
     r"conversations\[0\]\.tools is a string that is not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, kind, match):
    good = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": ["1"]}
    path = write(tmp_path, [good, record])
    with pytest.raises(DataError, match=rf"rl\.jsonl:2: .*{match}"):
        src = RLPromptSource(path, kind)
        src[1]
    src = RLPromptSource(path, kind, skip_bad_lines=True)
    assert len(src) == 1 and src.stats.bad_lines == 1


def test_sample_files_prompt_is_all_but_the_slot():
    for name, kind in (("rlaif.jsonl", "rlaif"), ("agent_rl.jsonl", "agent")):
        lines = (SAMPLE / name).read_text(encoding="utf-8").splitlines()
        src = RLPromptSource(SAMPLE / name, kind)
        assert len(src) == len(lines)
        for i in (0, len(src) - 1):
            raw = json.loads(lines[i])
            p = src[i]
            assert p.where == f"{SAMPLE / name}:{i + 1}" and p.gt == raw["gt"]
            assert [m["content"] for m in p.messages] == [m["content"] for m in raw["conversations"][:-1]]
            if kind == "agent":  # tools parsed from MiniMind-3's JSON string
                assert p.tools == json.loads(raw["conversations"][0]["tools"]) and p.gt_list == raw["gt"]


def test_sharded_iteration_is_disjoint_and_resumable():
    src = RLPromptSource(SAMPLE / "rlaif.jsonl", "rlaif")
    hosts = [[p.index for p in iter_rl_prompts(src, seed=3, shard_index=h, shard_count=3)] for h in range(3)]
    assert sum(map(len, hosts)) == len(src) // 3 * 3
    assert len(set().union(*map(set, hosts))) == sum(map(len, hosts))
    two = [p.index for p in iter_rl_prompts(src, seed=3, epochs=2, shard_index=1, shard_count=3)]
    resumed = [p.index for p in iter_rl_prompts(src, seed=3, epochs=2, shard_index=1, shard_count=3, start=150)]
    assert resumed == two[150:] and two[:100] == hosts[1] and two[100:] != hosts[1]


@pytest.fixture(scope="module")
def toks():
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"no fixture at {FIXTURE}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(FIXTURE)), load_tokenizer(FIXTURE)


def test_render_equals_minimind_datasets(toks):
    hf, ours = toks
    # MiniMind's AgentRLDataset: messages[:-1] and tools json.loads-ed from the system message
    agent = RLPromptSource(SAMPLE / "agent_rl.jsonl", "agent")
    raw = json.loads((SAMPLE / "agent_rl.jsonl").read_text(encoding="utf-8").splitlines()[0])
    tools = json.loads(raw["conversations"][0]["tools"])
    expect = hf.apply_chat_template(raw["conversations"][:-1], tools=tools, tokenize=False, add_generation_prompt=True)
    assert render_rl_prompt(agent[0], ours) == expect
    # MiniMind's RLAIFDataset: pre_processing_chat (system prompt) then open_thinking, on conversations[:-1]
    rlaif = RLPromptSource(SAMPLE / "rlaif.jsonl", "rlaif")
    seen = set()
    for seed in range(12):
        draws = np.random.default_rng(seed).random(3)
        messages = [dict(m) for m in rlaif[seed].messages]
        if draws[0] < 0.2:
            messages = [{"role": "system", "content": SYSTEM_PROMPTS[int(draws[1] * len(SYSTEM_PROMPTS))]}] + messages
        thinking = bool(draws[2] < 0.5)
        seen.add((draws[0] < 0.2, thinking))
        expect = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, open_thinking=thinking)
        assert render_rl_prompt(rlaif[seed], ours, rng=np.random.default_rng(seed)) == expect
    assert len(seen) >= 3
