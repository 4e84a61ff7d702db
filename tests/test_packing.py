"""Packed rows: document-aware attention (segment ids, positions restarting per document) against each document
run alone; the packed pretrain stream (a bos at every document start) and its segment ids / positions; the
document-masked loss against the same documents unpacked."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny

from minimind_jax import KVCache, MiniMindLM
from minimind_jax.data import DataError, PreparedSource
from minimind_jax.data.packing import PACK_KEYS, pretrain_row, stream_ends
from minimind_jax.data.prepared import encode_prepared_pretrain, prepare
from minimind_jax.precision import get_policy
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import from_dict
from minimind_jax.training.losses import count_trained_tokens, lm_loss
from minimind_jax.training.loop import train
from minimind_jax.training.stages import build_stage
from minimind_jax.training.step import make_apply

ROOT = pathlib.Path(__file__).resolve().parents[1]

LENGTHS = ((5, 7, 4), (16,), (1, 9, 6))  # three rows of 16 tokens: segments of these lengths


def segments_of(lengths):
    """(segment_ids, positions) of one row holding segments of ``lengths``: ids 1.., positions from 0 each."""
    seg = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    return seg.astype(np.int32), pos.astype(np.int32)


@pytest.mark.parametrize("name,kernels", [("tiny3", "auto"), ("tiny3-moe", "auto"), ("tiny2", "generic")])
def test_packed_row_logits_equal_each_document_alone(name, kernels):
    """Token for token (fp32, 1e-5): a packed row with segment ids and restarting positions gives each document the
    logits it has alone; ``generic`` runs jax.nn.dot_product_attention's XLA implementation with the mask."""
    config = tiny(name, kernels=kernels)
    params = cached_params(tiny(name))
    model = MiniMindLM(config, "fp32")
    ids = random_ids((len(LENGTHS), 16), seed=3)
    seg, pos = map(np.stack, zip(*(segments_of(n) for n in LENGTHS)))
    packed = jax.jit(lambda p, x, s, q: model.apply({"params": p}, x, position_ids=q, segment_ids=s).logits)(
        params, ids, seg, pos)
    alone = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            want = alone(params, ids[row: row + 1, start: start + n])[0]
            np.testing.assert_allclose(packed[row, start: start + n], want, atol=1e-5, rtol=1e-5)
            start += n
    # without the segment ids the documents see each other: the check above can fail
    causal = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(params, ids)
    assert float(jnp.max(jnp.abs(causal[0, 5:12] - packed[0, 5:12]))) > 1e-3


def test_segment_ids_refuse_a_kv_cache():
    config = tiny("tiny3")
    model = MiniMindLM(config, "fp32")
    ids = random_ids((1, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": cached_params(config)}, ids, segment_ids=jnp.ones((1, 4), jnp.int32),
                    cache=KVCache.init(config, 1, 8))


# ------------------------------------------------------------------------------------------------ pretrain rows
BOS, EOS = 1, 2


def reference_rows(docs, seq):
    """The packed rows by hand: stream bos doc eos per document, cut every ``seq`` tokens; a segment per document
    piece in the row (1..), positions from 0 at the piece's first token in the row, label -100 at each bos."""
    stream = [(tok, d, k == 0) for d, doc in enumerate(docs) for k, tok in enumerate([BOS, *doc, EOS])]
    rows = []
    for r in range(len(stream) // seq):
        part = stream[r * seq: (r + 1) * seq]
        seg, pos = [], []
        for k, (_, d, _) in enumerate(part):
            new = k == 0 or d != part[k - 1][1]
            seg.append(1 if k == 0 else seg[-1] + new)
            pos.append(0 if new else pos[-1] + 1)
        rows.append({"input_ids": [t for t, _, _ in part], "labels": [-100 if b else t for t, _, b in part],
                     "segment_ids": seg, "positions": pos})
    return rows


@pytest.mark.parametrize("seq", [4, 7, 16])
def test_pretrain_rows_match_the_framed_stream(seq):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, n).tolist() for n in (5, 0, 1, 23, 3, 9, 2)]  # an empty one, one over a row
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens = np.asarray([t for d in docs for t in d], np.uint16)
    want = reference_rows(docs, seq)
    ends = stream_ends(offsets)
    assert len(want) == (len(tokens) + 2 * len(docs)) // seq
    for i, row in enumerate(want):
        got = pretrain_row(tokens, offsets, ends, i, seq, bos_id=BOS, eos_id=EOS)
        assert set(got) == {"input_ids", "labels", *PACK_KEYS}
        for key, value in row.items():
            assert got[key].dtype == np.int32 and got[key].tolist() == value, (i, key)


def test_packed_rows_need_the_recorded_bos_id(tmp_path):
    tok = load_tokenizer(ROOT / "minimind_jax" / "assets" / "tokenizer")
    prepare(ROOT / "data" / "sample" / "pretrain.jsonl", tmp_path / "p", tok, workers=0, progress=False)
    rows = PreparedSource(tmp_path / "p", pack=True, max_seq_len=32)
    assert rows[0]["input_ids"][0] == tok.bos_token_id and rows[0]["segment_ids"][0] == 1
    meta_path = tmp_path / "p" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["bos_token_id"] = None
    meta_path.write_text(json.dumps(meta))
    PreparedSource(tmp_path / "p")  # unpacked rows add the tokenizer's bos: no need for the recorded one
    with pytest.raises(DataError, match=r"meta.json: packed rows need a bos id.*bos_token_id is None"):
        PreparedSource(tmp_path / "p", pack=True, max_seq_len=32)


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("name", ["tiny3", "tiny2-moe"])
def test_document_masked_loss_equals_the_documents_unpacked(name):
    """The token-mean loss of packed rows with document masking == that of the same documents in unpacked rows
    (bos doc eos, padded; the same tokens trained), 1e-5 fp32; without the mask it differs."""
    config = tiny(name)
    params = cached_params(config)
    apply = make_apply(config, get_policy("fp32"))
    seq = 16
    docs = [random_ids((1, n), seed=10 + n)[0].tolist() for n in (5, 7, 14, 1, 3, 6)]  # rows of whole documents
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens = np.asarray([t for d in docs for t in d], np.int32)
    rows = [pretrain_row(tokens, offsets, stream_ends(offsets), i, seq, bos_id=BOS, eos_id=EOS) for i in range(3)]
    packed = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    unpacked = [encode_prepared_pretrain({"ids": np.asarray(d)}, seq, bos_id=BOS, eos_id=EOS).arrays for d in docs]
    unpacked = {k: jnp.asarray(np.stack([u[k] for u in unpacked])) for k in ("input_ids", "labels")}
    assert float(count_trained_tokens(packed)) == float(count_trained_tokens(unpacked)) == len(tokens) + len(docs)

    def mean_loss(batch):
        loss_sum, _aux, _ = jax.jit(lm_loss, static_argnums=0)(apply, params, None, batch, jax.random.key(0))
        return float(loss_sum / count_trained_tokens(batch))

    want = mean_loss(unpacked)
    assert mean_loss(packed) == pytest.approx(want, rel=1e-5, abs=1e-5)
    plain = {k: packed[k] for k in ("input_ids", "labels")}
    assert abs(mean_loss(plain) - want) > 1e-4


def test_training_on_packed_prepared_rows_uses_the_document_mask(tmp_path):
    """The pretrain stage passes segment ids / positions to the model for packed prepared rows when
    ``document_mask`` is on (the losses then differ from the plain causal run's), and only then."""
    tok = load_tokenizer(ROOT / "minimind_jax" / "assets" / "tokenizer")
    data = tmp_path / "packed"
    prepare(ROOT / "data" / "sample" / "pretrain.jsonl", data, tok, workers=0, pack_max_seq_len=64, progress=False)
    model = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 16, "intermediate_size": 64}
    losses = {}
    for mask in (True, False):
        cfg = from_dict({"stage": "pretrain", "data_path": str(data), "preset": "minimind3", "model": model,
                         "out_dir": str(tmp_path / f"run_{mask}"), "batch_size": 8, "max_seq_len": 64,
                         "dtype": "float32", "max_steps": 2, "save_interval": 10, "log_interval": 1,
                         "shuffle": False, "progress": False, "sample_prompt": "", "async_checkpointing": False,
                         "tensorboard": False, "plot": False, "document_mask": mask})
        assert build_stage(cfg).batch_keys == ("input_ids", "labels") + (PACK_KEYS if mask else ())
        losses[mask] = train(cfg).losses
    assert all(np.isfinite(losses[True])) and abs(losses[True][0] - losses[False][0]) > 1e-4
    assert build_stage(from_dict({"stage": "pretrain", "document_mask": True})).batch_keys == ("input_ids", "labels")
