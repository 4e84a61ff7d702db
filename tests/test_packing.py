"""Packed rows: document-aware attention (segment ids, positions restarting per document) against each document
run alone; the packed pretrain stream (a bos at every document start) and its segment ids / positions; the
document-masked loss against the same documents unpacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny

from minimind_jax import KVCache, MiniMindLM
from minimind_jax.data.packing import PACK_KEYS, pretrain_row, stream_ends

LENGTHS = ((5, 7, 4), (16,), (1, 9, 6))  # three rows of 16 tokens: segments of these lengths


def segments_of(lengths):
    """(segment_ids, positions) of one row holding segments of ``lengths``: ids 1.., positions from 0 each."""
    seg = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    return seg.astype(np.int32), pos.astype(np.int32)


@pytest.mark.parametrize("name,kernels", [("tiny3", "auto"), ("tiny3-moe", "auto"), ("tiny2", "generic"),
                                          ("tiny3-moe", "generic")])
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
