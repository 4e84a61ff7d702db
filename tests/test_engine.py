"""Continuous batching (minimind_jax.engine) on a tiny random model: a request's tokens against the Generator's
for the same prompt and seed, alone and with others joining and leaving at different steps; slots freed at
once by an end, a stop and a cancellation; the queue's back-pressure, timeouts and shutdown."""

import threading
import time

import numpy as np
import pytest

from _util import cached_params, tiny
from minimind_jax import engine as engine_mod
from minimind_jax.engine import Engine, EngineError, Request, SlotDecoder
from minimind_jax.generate import Generator, SamplingParams

SLOTS, CACHE = 4, 64
NO_EOS = (-7,)  # never produced: every row runs to its limit


@pytest.fixture(scope="module")
def gen():
    cfg = tiny("tiny3")
    return Generator(cached_params(cfg), cfg)


def _prompts():
    rng = np.random.RandomState(1)
    return [list(rng.randint(3, 256, n)) for n in (7, 13, 3, 12, 16)]  # one prefill bucket (16): few compiles


SAMPLING = [SamplingParams(temperature=1.0, top_p=0.9, seed=11), SamplingParams(temperature=0.7, top_k=20, seed=12),
            SamplingParams.make_greedy(repetition_penalty=1.3), SamplingParams(temperature=1.2, top_p=1.0, seed=14),
            SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.1, seed=15)]


def _alone(dec: SlotDecoder, prompt, sampling, n: int, slot: int = 0) -> list[int]:
    tokens = [dec.prefill(slot, prompt, sampling)]
    while len(tokens) < n:
        tokens.append(int(dec.step()[slot]))
    dec.release(slot)
    return tokens


def test_a_slot_gives_the_generator_tokens_alone_and_among_others(gen):
    prompts, n = _prompts(), 16
    expected = [gen.generate([p], n, s, eos_ids=NO_EOS)[0].tokens for p, s in zip(prompts, SAMPLING)]
    dec = SlotDecoder.for_generator(gen, slots=SLOTS, cache_len=CACHE)
    for slot in (0, 3):  # alone, in any slot: the Generator's stream for that seed
        assert _alone(dec, prompts[0], SAMPLING[0], n, slot) == expected[0]

    # five requests over four slots, joining at steps 0, 0, 3, 5 and 9 (into the slot request 2 has freed)
    schedule = {0: [(0, 0), (1, 2)], 3: [(2, 1)], 5: [(3, 3)], 9: [(4, 1)]}
    limits = [n, n, 6, n, n]
    got: dict[int, list[int]] = {}
    running: dict[int, int] = {}  # request -> slot
    for step in range(3 * n):
        for i, slot in schedule.get(step, []):
            assert not dec.active[slot]
            got[i] = [dec.prefill(slot, prompts[i], SAMPLING[i])]
            running[i] = slot
        if not running:
            break
        tokens = dec.step()
        for i, slot in list(running.items()):
            got[i].append(int(tokens[slot]))
            if len(got[i]) == limits[i]:
                dec.release(running.pop(i))
    assert [got[i] for i in range(5)] == [e[:m] for e, m in zip(expected, limits)]


def test_prompts_prefilled_together_give_each_the_tokens_it_gets_alone(gen):
    """Several requests joining at once share one prefill call (rows padded to a power of two, prompts to the
    longest's bucket): each still gets the Generator's tokens for its seed, whatever joined with it."""
    prompts, n = _prompts() + [list(np.random.RandomState(2).randint(3, 256, 20))], 10  # the last: bucket 32
    sampling = SAMPLING + [SamplingParams(temperature=0.9, top_p=0.95, seed=16)]
    expected = [gen.generate([p], n, s, eos_ids=NO_EOS)[0].tokens for p, s in zip(prompts, sampling)]
    dec = SlotDecoder.for_generator(gen, slots=SLOTS, cache_len=CACHE)
    groups = [([0, 1, 3], [0, 1, 2]), ([1, 2], [3, 5])]  # (slots, requests): 3 rows padded to 4, then 2 rows
    got: dict[int, list[int]] = {}
    running: dict[int, int] = {}
    for step in range(3 * n):
        if step in (0, 4):
            slots, which = groups[step // 4]
            if step == 4:  # request 1 leaves early so that its slot is reused by the second group
                dec.release(running.pop(1))
            firsts = dec.prefill_many(slots, [prompts[i] for i in which], [sampling[i] for i in which])
            got.update({i: [t] for i, t in zip(which, firsts)})
            running.update(zip(which, slots))
        if not running:
            break
        tokens = dec.step()
        for i, slot in list(running.items()):
            got[i].append(int(tokens[slot]))
            if len(got[i]) == n:
                dec.release(running.pop(i))
    assert got[1] == expected[1][:len(got[1])] and len(got[1]) == 5
    assert {i: got[i] for i in (0, 2, 3, 5)} == {i: expected[i] for i in (0, 2, 3, 5)}


class _Grouping(SlotDecoder):
    """Records how many prompts each prefill call took."""

    groups: list[int]

    def prefill_many(self, slots, prompts, samplings):
        self.groups = getattr(self, "groups", []) + [len(prompts)]
        return super().prefill_many(slots, prompts, samplings)


def test_the_engine_prefills_waiting_requests_in_one_call(gen):
    prompts = _prompts()
    expected = [gen.generate([p], 6, s, eos_ids=NO_EOS)[0].tokens for p, s in zip(prompts, SAMPLING)]
    dec = _Grouping(gen.params, gen.config, slots=SLOTS, cache_len=CACHE)
    eng = Engine(dec, eos_ids=NO_EOS)
    eng.start()
    try:
        hold = threading.Event()
        first = eng.submit(_Collect(prompts[0], 6, SAMPLING[0], then=_at(1, hold.wait)))
        while not first.tokens:  # the engine is held at the first request's first token
            time.sleep(0.01)
        later = [eng.submit(_Collect(p, 6, s)) for p, s in zip(prompts[1:], SAMPLING[1:])]
        hold.set()
        assert [r.result(120).tokens for r in (first, *later)] == expected
    finally:
        eng.close()
    assert dec.groups == [1, 3, 1]  # three joined the running row in one call; the fifth waited for a free slot


def _compiled() -> tuple[int, int]:
    return engine_mod._prefill_slots._cache_size(), engine_mod._step_slots._cache_size()


def test_warm_up_compiles_every_shape_and_changes_no_answer(gen):
    dec = SlotDecoder.for_generator(gen, slots=3, cache_len=40)  # widths 1, 2, 3; prompt buckets 16, 32, 40
    eng = Engine(dec, eos_ids=NO_EOS, warm_up=True)
    eng.start()
    try:
        prompt, sampling = _prompts()[0], SAMPLING[0]
        expected = gen.generate([prompt], 4, sampling, eos_ids=NO_EOS)[0].tokens
        assert eng.submit(Request(prompt, 4, sampling)).result(120).tokens == expected  # served after the warm-up
        compiled = _compiled()
        rng = np.random.RandomState(5)
        requests = [eng.submit(Request(list(rng.randint(3, 256, n)), 4)) for n in (35, 20, 5)]  # buckets 40, 32, 16
        assert all(len(r.result(120).tokens) == 4 for r in requests)
        assert _compiled() == compiled  # nothing compiled while serving
    finally:
        eng.close()


def test_moe_with_scanned_layers_decodes_in_slots():
    """The vmapped step over an MoE model (dense dispatch in the step) and the scanned cache layout."""
    cfg = tiny("tiny3", use_moe=True, scan_layers=True)
    moe = Generator(cached_params(cfg), cfg)
    prompt, sampling = _prompts()[1], SAMPLING[0]
    expected = moe.generate([prompt], 8, sampling, eos_ids=NO_EOS)[0].tokens
    dec = SlotDecoder.for_generator(moe, slots=2, cache_len=32)
    dec.prefill(0, _prompts()[0], SAMPLING[1])  # a neighbour in the other slot
    assert _alone(dec, prompt, sampling, 8, slot=1) == expected


@pytest.mark.parametrize("scanned_moe", [False, True])
def test_a_long_prompt_prefilled_in_chunks_gives_the_generator_tokens(gen, scanned_moe):
    """A prompt longer than chunk_tokens goes in one chunk per call (the last one overlapping the one before it),
    while another slot decodes between the chunks: both get the Generator's tokens for their seeds."""
    if scanned_moe:
        cfg = tiny("tiny3", use_moe=True, scan_layers=True)
        gen = Generator(cached_params(cfg), cfg)
    rng = np.random.RandomState(5)
    dec = SlotDecoder.for_generator(gen, slots=2, cache_len=CACHE, chunk_tokens=8)
    neighbour, n = _prompts()[1], 12
    expected_neighbour = gen.generate([neighbour], n, SAMPLING[1], eos_ids=NO_EOS)[0].tokens
    for length, sampling in ((20, SAMPLING[2]), (9, SAMPLING[0]), (40, SAMPLING[4])):
        prompt = list(rng.randint(3, 256, length))
        expected = gen.generate([prompt], n, sampling, eos_ids=NO_EOS)[0].tokens
        got_neighbour = [dec.prefill(0, neighbour, SAMPLING[1])]
        done, token, calls = 0, None, 0
        while token is None:
            done, token = dec.prefill_part(1, prompt, done, sampling)
            calls += 1
            if token is None:
                got_neighbour.append(int(dec.step()[0]))  # the chunking slot stays out of the step
        assert calls == -(-length // 8) and dec.active[1]
        got = [token]
        while len(got) < n:
            tokens = dec.step()
            got.append(int(tokens[1]))
            got_neighbour.append(int(tokens[0]))
        assert got == expected
        assert got_neighbour[:n] == expected_neighbour
        dec.release(0)
        dec.release(1)
    with pytest.raises(ValueError, match="no chunk"):
        dec.prefill_part(1, list(range(3, 10)), 0, SAMPLING[0])  # 7 tokens: not a chunked prompt


def test_chunks_shrink_as_the_prompt_grows_and_still_give_the_generator_tokens(gen):
    """With chunk_scores 8 x 16, a chunk attending within 32 columns holds 4 tokens, within 64 two: a 60-token
    prompt takes more calls than 60 / 8, each within the budget, and its tokens are still the Generator's."""
    dec = SlotDecoder.for_generator(gen, slots=1, cache_len=CACHE, chunk_tokens=8, chunk_scores=8 * 16)
    assert [dec._chunk_len(kv) for kv in (16, 32, 64, 128)] == [8, 4, 2, 1]
    prompt = list(np.random.RandomState(7).randint(3, 256, 60))
    expected = gen.generate([prompt], 6, SAMPLING[3], eos_ids=NO_EOS)[0].tokens
    done, token, sizes = 0, None, []
    while token is None:
        before = done
        done, token = dec.prefill_part(0, prompt, done, SAMPLING[3])
        sizes.append(done - before)
    assert len(sizes) > 20 and sizes[:2] == [8, 8] and 2 in sizes
    got = [token] + [int(dec.step()[0]) for _ in range(5)]
    assert got == expected


class _Collect(Request):
    """Records the hooks' calls; ``then(k)`` runs on the engine thread at this request's k-th token."""

    def __init__(self, *args, then=None, stop_after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.then, self.stop_after = then, stop_after
        self.events: list = []

    def on_start(self):
        self.events.append("start")

    def on_token(self, token, is_eos):
        if self.then is not None:
            self.then(len(self.tokens))
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def on_finish(self, reason):
        self.events.append(reason)

    def on_error(self, error):
        self.events.append(error.code)


def _at(k, action):
    return lambda count: action() if count == k else None


@pytest.fixture()
def engine(gen):
    eng = Engine(SlotDecoder.for_generator(gen, slots=2, cache_len=CACHE), eos_ids=NO_EOS, max_queue=8)
    eng.start()
    yield eng
    eng.close()


def test_the_engine_joins_requests_mid_decode_with_the_same_tokens(gen, engine):
    prompts = _prompts()
    expected = [gen.generate([p], 16, s, eos_ids=NO_EOS)[0].tokens for p, s in zip(prompts, SAMPLING)]
    late = [_Collect(prompts[i], 16, SAMPLING[i]) for i in (1, 2)]
    first = _Collect(prompts[0], 16, SAMPLING[0], then=_at(3, lambda: engine.submit(late[0])))
    stopper = _Collect(prompts[3], 16, SAMPLING[3], stop_after=5, then=_at(2, lambda: engine.submit(late[1])))
    engine.submit(first)
    engine.submit(stopper)
    results = [r.result(120) for r in (first, stopper, *late)]
    assert [r.tokens for r in results] == [expected[0], expected[3][:5], expected[1], expected[2]]
    assert [r.finish_reason for r in results] == ["length", "stop", "length", "length"]
    assert first.events == ["start", "length"] and stopper.events == ["start", "stop"]
    # the late requests waited for no batch: each took the slot freed by the stop string or the limit at once
    assert engine.steps_with_rows[2] >= 12 and engine.slots_in_use == 0 and engine.queued == 0
    assert engine.tokens_per_s() > 0


def test_cancel_frees_the_slot_before_the_next_step(gen, engine):
    prompts = _prompts()
    long = _Collect(prompts[4], 30, SAMPLING[4])
    long.then = _at(4, lambda: setattr(long, "cancelled", True))
    waiting = [_Collect(prompts[i], 8, SAMPLING[i]) for i in (0, 1)]
    blocker = _Collect(prompts[2], 30, SAMPLING[2])
    for r in (blocker, long, *waiting):
        engine.submit(r)
    assert long.result(120).finish_reason == "cancelled" and len(long.tokens) == 4
    assert long.events == ["start", "cancelled"]
    assert [r.result(120).finish_reason for r in waiting] == ["length", "length"]
    blocker.cancelled = True
    assert blocker.result(120).finish_reason == "cancelled" and len(blocker.tokens) < 30


def test_back_pressure_timeout_and_shutdown(gen):
    dec = SlotDecoder.for_generator(gen, slots=2, cache_len=CACHE)
    eng = Engine(dec, eos_ids=NO_EOS, max_queue=1, timeout_s=60)
    prompt = _prompts()[0]
    with pytest.raises(EngineError) as e:
        eng.submit(_Collect(prompt, 4))
    assert e.value.status == 503  # not started
    eng.start()
    with pytest.raises(EngineError) as e:
        eng.submit(_Collect(prompt, CACHE))
    assert (e.value.status, e.value.code) == (400, "context_length_exceeded") and f"{CACHE} tokens" in e.value.message
    holds = {1: threading.Event(), 3: threading.Event()}  # the running request holds the engine at tokens 1 and 3
    running = _Collect(prompt, CACHE - len(prompt), then=lambda k: holds[k].wait() if k in holds else None)
    other = eng.submit(_Collect(prompt, CACHE - len(prompt), then=_at(1, lambda: eng.submit(running))))
    deadline = time.monotonic() + 60
    while eng.queued or eng.slots_in_use < 2:  # both have left the queue for a slot
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = eng.submit(_Collect(prompt, 4))
    with pytest.raises(EngineError) as e:
        eng.submit(_Collect(prompt, 4))
    assert (e.value.status, e.value.code) == (429, "queue_full")
    queued.deadline = time.monotonic()  # late: it ends with a timeout, without a slot
    holds[1].set()
    with pytest.raises(EngineError) as e:
        queued.result(60)
    assert (e.value.status, e.value.code) == (504, "timeout") and queued.events == ["timeout"]
    closer = threading.Thread(target=eng.close)
    closer.start()
    while not eng.closing:
        time.sleep(0.01)
    holds[3].set()
    closer.join(60)
    assert running.events == ["start", "shutting_down"] and running.error.status == 503 and len(running.tokens) == 3
    assert other.events == ["start", "shutting_down"]
    with pytest.raises(EngineError) as e:
        eng.submit(_Collect(prompt, 4))
    assert e.value.status == 503


def test_engine_rows_give_the_generator_rows_and_raise_the_engines_errors(gen):
    """EngineRows (the completions API's rows): more rows than slots, each the Generator's tokens for its seed,
    streamed step by step; a refusal is raised when the rows are submitted, a timeout from the stream."""
    prompts, limits = _prompts(), 9
    expected = [r.tokens for r in gen.generate(prompts, limits, SAMPLING, eos_ids=NO_EOS)]
    eng = Engine(SlotDecoder.for_generator(gen, slots=SLOTS, cache_len=CACHE), NO_EOS)
    rows = engine_mod.EngineRows(eng)
    with pytest.raises(EngineError, match="shutting down"):  # not started yet
        rows.stream(prompts, limits, SAMPLING)
    eng.start()
    try:
        got = [[] for _ in prompts]
        for new in rows.stream(prompts, limits, SAMPLING):
            for acc, toks in zip(got, new):
                acc.extend(toks)
        assert got == expected
        assert [r.tokens for r in rows.generate(prompts[:2], limits, SAMPLING[:2])] == expected[:2]
        assert rows.eos_ids == NO_EOS
        eng.timeout_s = 1e-9  # every row is out of time before its first step
        with pytest.raises(EngineError, match="timeout"):
            rows.generate(prompts[:1], limits, SAMPLING[:1])
    finally:
        eng.close()
    assert eng.slots_in_use == 0


def test_a_long_prompt_does_not_hold_up_the_running_requests(gen):
    """While a long prompt is prefilled chunk by chunk, the request beside it decodes a token per chunk (whole,
    the long prompt's prefill would come first: it was queued first); both get the Generator's tokens."""
    rng = np.random.RandomState(6)
    long_prompt, short_prompt = list(rng.randint(3, 256, 40)), _prompts()[0]
    expected_long = gen.generate([long_prompt], 4, SAMPLING[0], eos_ids=NO_EOS)[0].tokens
    expected_short = gen.generate([short_prompt], 12, SAMPLING[1], eos_ids=NO_EOS)[0].tokens
    eng = Engine(SlotDecoder.for_generator(gen, slots=2, cache_len=CACHE, chunk_tokens=8), NO_EOS)
    short = _Collect(short_prompt, 12, SAMPLING[1])
    seen_by_long: list[int] = []
    long = _Collect(long_prompt, 4, SAMPLING[0], then=lambda k: seen_by_long.append(len(short.tokens)))
    eng.start()
    try:
        with eng._cond:  # both queued before the worker looks: the long prompt first
            eng.submit(long)
            eng.submit(short)
        assert long.result(120).tokens == expected_long and short.result(120).tokens == expected_short
    finally:
        eng.close()
    assert seen_by_long[0] >= 4  # 5 chunks of 8: the short request decoded between them
    assert eng.slots_in_use == 0 and not eng._chunking


def test_chunked_prefill_memory_is_linear_in_the_prompt(gen):
    """XLA's temp buffers of the chunk program double when the cache doubles; a whole-prompt prefill's grow 4x."""
    cfg = tiny("tiny3", max_position_embeddings=4096)
    long_gen = Generator(cached_params(cfg), cfg)
    rows = engine_mod.row_settings([SamplingParams(seed=0)], [1], ())
    chunk, whole = [], []
    for cache in (2048, 4096):
        dec = SlotDecoder.for_generator(long_gen, slots=1, cache_len=cache, chunk_tokens=256)
        compiled = engine_mod._prefill_chunk.lower(
            dec.params, dec._state, np.int32(0), np.zeros((1, 256), np.int32), np.int32(0), np.bool_(True), rows,
            config=dec.config, policy=dec.policy, kv_len=cache).compile()
        chunk.append(compiled.memory_analysis().temp_size_in_bytes)
        compiled = engine_mod._prefill_slots.lower(
            dec.params, dec._state, np.zeros(1, np.int32), np.zeros((1, cache), np.int32), np.ones(1, np.int32), rows,
            config=dec.config, policy=dec.policy).compile()
        whole.append(compiled.memory_analysis().temp_size_in_bytes)
    assert chunk[1] / chunk[0] < 2.5 and whole[1] / whole[0] > 3.5, (chunk, whole)
    assert chunk[1] < whole[1] / 8
