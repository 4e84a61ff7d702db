"""A Hugging Face sequence-classification model as the ``reward_model`` reward (the torch extra): on a tiny random
Qwen2ForSequenceClassification saved locally (nothing downloaded), the scores equal a direct transformers forward
pass of the same rendering (chat template, or a text pair without one), a batch equals each scored alone,
``--reward_model DIR`` picks it for a Hugging Face directory, and a bad directory is one error naming it."""

import json
import shutil
from pathlib import Path

import pytest

from minimind_jax.precision import get_policy
from minimind_jax.rl import hf_reward, reward_model
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import TrainConfigError, from_dict, model_config
from minimind_jax.training.stages import build_stage
from minimind_jax.weights import WeightsError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "minimind_jax" / "assets" / "tokenizer"
RLAIF = str(ROOT / "data" / "sample" / "rlaif.jsonl")
PROMPTS = [{"messages": [{"role": "user", "content": "What is 3 + 4?"}]},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
           {"messages": [{"role": "user", "content": "Sort 3 1 2."}]}]
REPLIES = ["7", "Blue, the colour of a clear sky at noon, is a fine example of one.", "1 2 3"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """(a directory with a chat template, the same model whose tokenizer has none)."""
    root = tmp_path_factory.mktemp("hf_reward")
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                                      pad_token_id=tok.pad_token_id, initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.Qwen2ForSequenceClassification(config)
    model.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    shutil.copytree(root / "chat", root / "plain")
    (root / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((root / "plain" / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (root / "plain" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return root / "chat", root / "plain"


def direct_score(path, prompt, reply) -> float:
    """The reference: a fresh transformers model and tokenizer from the directory, one unpadded row."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tok.chat_template:
        text = tok.apply_chat_template([*prompt["messages"], {"role": "assistant", "content": reply}], tokenize=False)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tok("\n".join(m["content"] for m in prompt["messages"]), reply, return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc).logits[0, 0])


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_scores_equal_a_direct_transformers_forward_and_batch_equals_alone(hf_dirs, kind):
    path = hf_dirs[0] if kind == "chat" else hf_dirs[1]
    scorer = reward_model.open_reward_model(path, tokenizer=None)
    assert isinstance(scorer, hf_reward.HFRewardModel)
    assert isinstance(scorer.render(REPLIES[0], PROMPTS[0]), str if kind == "chat" else tuple)
    want = [direct_score(path, p, r) for p, r in zip(PROMPTS, REPLIES)]
    batch = scorer.batch(REPLIES, PROMPTS)  # rows of different lengths: right padding is exercised
    alone = [scorer(r, p) for p, r in zip(PROMPTS, REPLIES)]
    assert max(want) - min(want) > 0.01, want  # the scores differ, so the comparison means something
    for got in (batch, alone):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    scorer.batch_size = 2  # more rows than one forward: chunked, same scores
    assert scorer.batch(REPLIES, PROMPTS) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_the_grpo_stage_takes_a_hugging_face_reward_model(hf_dirs):
    cfg = from_dict({"stage": "grpo", "data_path": RLAIF, "rewards": {"reward_model": 1.0, "minimind": 0.5},
                     "reward_model": str(hf_dirs[0]), "model": {"hidden_size": 64, "num_hidden_layers": 1,
                                                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                                                "head_dim": 16, "intermediate_size": 128}})
    stage = build_stage(cfg, model_config(cfg), get_policy("fp32"), None, load_tokenizer())
    assert isinstance(stage.prepare.extra_rewards["reward_model"], hf_reward.HFRewardModel)


def test_a_bad_reward_model_directory_is_one_error_naming_it(hf_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_dirs[0] / "config.json", no_weights / "config.json")
    cases = [(tmp_path / "missing", "no such directory"), (tmp_path / "empty", "neither a reward model"),
             (causal, "a Qwen2ForCausalLM, not a sequence-classification"),
             (no_weights, "cannot load a Hugging Face sequence-classification model")]
    for path, message in cases:
        with pytest.raises(WeightsError, match=f"^reward_model {path}: {message}") as e:
            reward_model.open_reward_model(path, tokenizer=None)
        assert "\n" not in str(e.value)
    cfg = from_dict({"stage": "grpo", "data_path": RLAIF, "rewards": {"reward_model": 1.0},
                     "reward_model": str(causal)})
    with pytest.raises(TrainConfigError, match=f"reward_model {causal}: a Qwen2ForCausalLM"):
        build_stage(cfg, model_config(cfg), get_policy("fp32"), None, load_tokenizer())
