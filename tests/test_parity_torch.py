"""Golden-logit parity: our model against transformers' Qwen3 / Qwen3-MoE / Llama and a numpy reference.

Random weights *including the norm weights*, float32 everywhere; we report and bound the max |logit diff|
and the KL divergence of the softmaxes (as MaxText's forward-pass checker does).
Needs the torch extra (torch + transformers) except the numpy-reference test.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.mapping import params_to_torch, torch_to_params
from minimind_jax import MiniMindLM, ModelConfig, init_params

TOL = 1e-4


def report(name, ours, ref, capsys):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    diff = np.abs(ours - ref).max()
    logp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    logq = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(logp) * (logp - logq), axis=-1)))
    with capsys.disabled():
        print(f"\n{name}: max |logit diff| {diff:.2e}, KL {kl:.2e}, max |logit| {np.abs(ref).max():.2f}")
    assert diff <= TOL, f"{name}: max |logit diff| {diff} > {TOL}"
    assert kl < 1e-8


def our_logits(config, params, ids):
    fn = jax.jit(lambda p, x: MiniMindLM(config, "fp32").apply({"params": p}, x).logits)
    return np.asarray(fn(params, jnp.asarray(ids)))


def randomized(params, seed=0):
    """Give every weight a realistic spread: norms ~ 1 + 0.3 N(0,1), projections ~ N(0, 0.05)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.RandomState(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.asarray(1 + 0.3 * rng.randn(*leaf.shape), jnp.float32))
        else:
            out.append(jnp.asarray(0.05 * rng.randn(*leaf.shape), jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def ids_for(vocab, shape=(2, 24), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1e6)


def _hf_config(kind, preset):
    transformers = pytest.importorskip("transformers")
    if preset:
        cfg = ModelConfig.preset(preset)
        shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=True, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps)
        if kind != "llama":
            shape["head_dim"] = cfg.head_dim
        if cfg.use_moe:
            shape.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                         moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=True)
    else:
        shape = dict(SMALL, intermediate_size=128)
        if kind != "llama":
            shape.update(head_dim=16, rms_norm_eps=1e-6)
        else:
            shape.update(rms_norm_eps=1e-5)
        if kind == "qwen3_moe":
            shape.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True)
    cls = {"qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig,
           "llama": transformers.LlamaConfig}[kind]
    return cls(**shape)


@pytest.mark.parametrize("kind,preset", [("qwen3", None), ("qwen3", "minimind3"), ("llama", None),
                                         ("llama", "minimind2-small")])
def test_dense_matches_transformers(kind, preset, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = _hf_config(kind, preset)
    cls = transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls._from_config(hf, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    config = ModelConfig.from_json(hf.to_dict())
    if preset:
        assert config.generation == ModelConfig.preset(preset).generation
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = torch_to_params(state, config)
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    report(f"{kind} {preset or 'tiny'}", our_logits(config, params, ids), ref, capsys)


@pytest.mark.parametrize("preset", [None, "minimind3-moe"])
def test_qwen3_moe_matches_transformers(preset, tmp_path, capsys):
    """transformers 5 fuses expert weights in memory, so go through an HF directory with per-expert tensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import save_file

    hf = _hf_config("qwen3_moe", preset)
    config = ModelConfig.from_json(hf.to_dict())
    assert config.use_moe and config.generation == "minimind3"
    params = randomized(abstract_params(config), seed=1)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params_to_torch(params, config).items()},
              os.fspath(tmp_path / "model.safetensors"))
    hf.save_pretrained(tmp_path)
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    report(f"qwen3_moe {preset or 'tiny'}", our_logits(config, params, ids), ref, capsys)


def abstract_params(config):
    """The params' shapes and dtypes without compiling or running an init."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


# ------------------------------------------------------------------------ minimind2-moe: numpy reference
def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1 + np.exp(-x))


def numpy_minimind2_moe(sd, cfg, ids):
    """MiniMind2's MoE forward pass in float64 numpy, written from the MiniMind source's definitions
    (torch weight layout: y = x @ W.T)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    b, t = ids.shape
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = sd["model.embed_tokens.weight"][ids]
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(v):  # (b, t, heads, d)
        rot = np.concatenate([-v[..., d // 2:], v[..., :d // 2]], -1)
        return v * cos[None, :, None] + rot * sin[None, :, None]

    def ffn(v, prefix):
        g = v @ sd[f"{prefix}.gate_proj.weight"].T
        u = v @ sd[f"{prefix}.up_proj.weight"].T
        return (_silu(g) * u) @ sd[f"{prefix}.down_proj.weight"].T

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms(x, sd[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        q = rope((h @ sd[f"{p}.self_attn.q_proj.weight"].T).reshape(b, t, nh, d))
        k = rope((h @ sd[f"{p}.self_attn.k_proj.weight"].T).reshape(b, t, nkv, d))
        v = (h @ sd[f"{p}.self_attn.v_proj.weight"].T).reshape(b, t, nkv, d)
        k, v = np.repeat(k, nh // nkv, axis=2), np.repeat(v, nh // nkv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        scores = scores + np.triu(np.full((t, t), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, nh * d)
        x = x + attn @ sd[f"{p}.self_attn.o_proj.weight"].T
        h = _rms(x, sd[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(b * t, -1)
        logits = h @ sd[f"{p}.mlp.gate.weight"].T
        gate = np.exp(logits - logits.max(-1, keepdims=True))
        gate /= gate.sum(-1, keepdims=True)
        y = np.zeros_like(h)
        for n in range(b * t):
            top = np.argsort(-gate[n])[:cfg.num_experts_per_tok]
            w = gate[n, top] / (gate[n, top].sum() + 1e-20)
            for e, we in zip(top, w):
                y[n] += we * ffn(h[n], f"{p}.mlp.experts.{e}")
        for s in range(cfg.n_shared_experts):
            y += ffn(h, f"{p}.mlp.shared_experts.{s}")
        x = x + y.reshape(b, t, -1)
    x = _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["model.embed_tokens.weight"].T


@pytest.mark.parametrize("moe_impl", ["dense", "sorted"])
def test_minimind2_moe_matches_numpy_reference(moe_impl, capsys):
    config = ModelConfig.preset("tiny2-moe", vocab_size=512, moe_impl=moe_impl)
    params = randomized(abstract_params(config), seed=2)
    ids = ids_for(config.vocab_size, (2, 16))
    ref = numpy_minimind2_moe(params_to_torch(params, config), config, ids)
    report(f"minimind2-moe ({moe_impl}) vs numpy", our_logits(config, params, ids), ref, capsys)
