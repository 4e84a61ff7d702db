"""The train state and the one jitted train step every stage runs.

``train_step(state, batch) -> (state, metrics)`` where every leaf of ``batch`` is ``(accumulation_steps,
micro_batch, seq)``. Inside one compiled call:

1. the stage's normalizer over the whole batch (e.g. the number of trained tokens);
2. for each micro-batch (a ``lax.scan`` when accumulating): ``value_and_grad`` of the stage loss with the loss
   multiplied by the loss scale, under the precision policy (float32 params are cast to the compute dtype
   where they are used; logits and loss are float32); gradients summed in float32;
3. unscale, finiteness check, loss-scale adjustment (dynamic scaling for fp16);
4. the optax chain ``apply_if_finite(clip_by_global_norm -> adamw)``: a step with an inf / nan gradient
   leaves params and optimizer state unchanged and is counted in ``skipped``;
5. a stage with ``update_passes`` = k > 1 (PPO) repeats 2-4 k times on the same batch (k optimizer updates,
   each counted by the optimizer and its lr schedule; ``state.step`` still counts one train step), passes
   stopped early by the stage's ``stop_passes`` leaving params and optimizer state as they are.

The state is donated, so params and optimizer state are updated in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import MiniMindLM, init_params
from minimind_jax.precision import (
    LossScale,
    Policy,
    all_finite,
    clip_by_global_norm,
    current_scale,
    get_policy,
    guarded_update,
    make_loss_scale,
    skip_nonfinite,
    skipped_in_a_row,
    skipped_steps,
)
from minimind_jax.training.stages import Stage


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array  # raw uint32 key data (checkpointable); dropout keys are folded from it per step
    frozen: Any = None  # params that are not trained (a reference / teacher / base model), or None


def minimind_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """MiniMind's ``get_lr``: ``lr * (0.1 + 0.45 * (1 + cos(pi * step / total)))`` — from lr down to 0.1 lr —
    after an optional linear warmup (MiniMind has none)."""
    total = max(int(total_steps), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = learning_rate * (0.1 + 0.45 * (1.0 + jnp.cos(math.pi * step / total)))
        if warmup_steps:
            lr = jnp.where(step < warmup_steps, learning_rate * (step + 1) / warmup_steps, lr)
        return lr

    return schedule


def make_optimizer(learning_rate: float, total_steps: int, *, schedule: str = "minimind", warmup_steps: int = 0,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (MiniMind's optimizer) behind global-norm clipping, wrapped to skip non-finite updates."""
    tx, sched = adamw_chain(learning_rate, total_steps, schedule=schedule, warmup_steps=warmup_steps,
                            weight_decay=weight_decay, b1=b1, b2=b2, eps=eps, grad_clip=grad_clip)
    return skip_nonfinite(tx), sched


def adamw_chain(learning_rate: float, total_steps: int, *, schedule: str = "minimind", warmup_steps: int = 0,
                weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                grad_clip: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm -> adamw`` on its schedule, not yet wrapped by ``skip_nonfinite`` (a stage with
    several trained parts combines one per part, then wraps the whole)."""
    if schedule == "minimind":
        sched = minimind_schedule(learning_rate, total_steps, warmup_steps)
    else:
        sched = optax.constant_schedule(learning_rate)
    parts = [clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), sched


def make_apply(config: ModelConfig, policy: Policy):
    model = MiniMindLM(config, policy)

    def apply(params, input_ids, rng, **kwargs):
        return model.apply({"params": params}, input_ids, train=True, rngs={"dropout": rng}, **kwargs)

    return apply


def make_train_step(stage: Stage, config: ModelConfig, policy: Policy | str, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    """The pure ``train_step(state, batch) -> (state, metrics)`` (not jitted: see :func:`jit_train_step`).

    A stage with ``update_passes`` > 1 (PPO) takes that many optimizer updates on the same batch inside the one
    step (:func:`_passes`); ``state.step`` still counts train steps (one per batch)."""
    policy = get_policy(policy)
    apply = make_apply(config, policy)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        denom = jnp.maximum(stage.normalizer(batch), 1.0)
        base_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        scale = state.loss_scale

        def gradients(params, batch, rng):
            """(loss, aux, metrics, float32 unscaled grads cast to the params' dtypes) of the whole batch."""
            loss, aux, metrics, grads = _accumulated_gradients(stage, apply, state.frozen, scale, denom,
                                                               params, batch, rng)
            grads = scale.unscale(grads)
            return loss, aux, metrics, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

        if stage.update_passes == 1:
            loss, aux, metrics, grads = gradients(state.params, batch, base_rng)
            finite = all_finite(grads)
            params, opt_state = guarded_update(tx, grads, state.opt_state, state.params, finite)
            grad_norm = optax.tree.norm(grads)
        else:
            params, opt_state, finite, (loss, aux, metrics, grad_norm) = _passes(
                stage, tx, gradients, state.params, state.opt_state, batch, base_rng)
        new_scale = scale.adjust(finite)
        out = _step_metrics(loss, aux, grad_norm, scale, opt_state, finite, params, denom, metrics)
        if schedule is not None:  # the optimizer's own count skips skipped steps
            if stage.update_passes == 1:
                out["lr"] = schedule(state.step - skipped_steps(opt_state))
            else:  # the lr of this step's first update
                out["lr"] = schedule(_update_count(state.opt_state))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=new_scale)
        return new_state, out

    return train_step


def _accumulated_gradients(stage: Stage, apply, frozen, scale, denom, params, batch, base_rng):
    """``value_and_grad`` of the stage loss over the micro-batches of ``batch`` (a ``lax.scan`` when
    accumulating): (summed loss, mean aux, mean metrics, summed float32 grads, still loss-scaled)."""
    accum = batch[stage.batch_keys[0]].shape[0]

    def micro_loss(params, micro, rng):
        loss_sum, aux, metrics = stage.loss(apply, params, frozen, micro, rng)
        loss = loss_sum / denom
        return scale.scale(loss + aux / accum), (loss, aux, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def one(i):
        micro = jax.tree.map(lambda x: x[i], batch)
        (_, (loss, aux, metrics)), grads = grad_fn(params, micro, jax.random.fold_in(base_rng, i))
        return loss, aux, metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    if accum == 1:
        return one(0)

    def body(carry, i):
        loss, aux, metrics, grads = one(i)
        c_loss, c_aux, c_metrics, c_grads = carry
        return (c_loss + loss, c_aux + aux / accum, jax.tree.map(lambda a, b: a + b / accum, c_metrics, metrics),
                jax.tree.map(jnp.add, c_grads, grads)), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), jax.eval_shape(lambda: one(0)[2]))
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_metrics, zero_grads)
    (loss, aux, metrics, grads), _ = jax.lax.scan(body, init, jnp.arange(accum))
    return loss, aux, metrics, grads


def _passes(stage: Stage, tx, gradients, params, opt_state, batch, base_rng):
    """``stage.update_passes`` updates on the same batch (a ``lax.scan`` over the passes). Pass ``p`` sees
    ``update_pass`` = p in its micro-batches; once ``stage.stop_passes(metrics)`` is true (PPO: the approximate
    KL to the rollout policy is too large), that pass and the later ones leave params and optimizer state as
    they are (not counted as skipped steps: ``skipped`` counts non-finite gradients only). Each applied pass
    is one optimizer update (the lr schedule counts updates). Returns (params, opt_state, all gradients of the
    applied passes finite, (loss, aux, metrics, grad_norm) averaged over the evaluated passes: the applied ones
    and the one that stopped), with ``passes_done`` (applied passes) among the metrics."""
    accum = batch[stage.batch_keys[0]].shape[0]

    def one_pass(carry, p):
        params, opt_state, stopped = carry
        pass_batch = {**batch, "update_pass": jnp.full((accum,), p, jnp.int32)}
        loss, aux, metrics, grads = gradients(params, pass_batch, jax.random.fold_in(base_rng, p))
        finite = all_finite(grads)
        stop = stopped | (stage.stop_passes(metrics) if stage.stop_passes is not None else False)
        params, opt_state = jax.lax.cond(stop, lambda: (params, opt_state),
                                         lambda: guarded_update(tx, grads, opt_state, params, finite))
        summary = (loss, aux, metrics, optax.tree.norm(grads))
        return (params, opt_state, stop), (summary, finite | stop, ~stopped, ~stop)

    (params, opt_state, _), (summary, finite, evaluated, applied) = jax.lax.scan(
        one_pass, (params, opt_state, jnp.zeros((), bool)), jnp.arange(stage.update_passes))
    weight = evaluated.astype(jnp.float32) / jnp.sum(evaluated)
    loss, aux, metrics, grad_norm = jax.tree.map(lambda x: jnp.tensordot(weight, x.astype(jnp.float32), 1), summary)
    metrics = {**metrics, "passes_done": jnp.sum(applied).astype(jnp.float32)}
    return params, opt_state, jnp.all(finite), (loss, aux, metrics, grad_norm)


def _update_count(opt_state) -> jax.Array:
    """The optimizer's count of applied updates (AdamW's ``count``; every trained part's is the same)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1]


def _step_metrics(loss, aux, grad_norm, scale, opt_state, finite, params, denom, metrics) -> dict:
    return {
        "loss": loss,
        "aux_loss": aux,
        "grad_norm": grad_norm,
        "loss_scale": current_scale(scale),
        "skipped": skipped_steps(opt_state).astype(jnp.int32),
        "skipped_in_a_row": skipped_in_a_row(opt_state).astype(jnp.int32),
        "finite": finite,
        # the update itself: finite gradients can still give non-finite params (an infinite learning rate,
        # an overflowing moment); the loop never saves such a state
        "params_finite": all_finite(params),
        "trained_tokens": denom,
        **metrics,
    }


# ------------------------------------------------------------------------------------------------ sharding
def state_shardings(state_shape: TrainState, param_sharding, mesh, tx: optax.GradientTransformation,
                    frozen_sharding=None) -> TrainState:
    """Shardings for a TrainState (``state_shape`` from ``jax.eval_shape``): params per ``param_sharding``,
    optimizer moments like their params (``optax.tree_map_params``), frozen params per ``frozen_sharding``
    (replicated when not given), everything else replicated."""
    rep = NamedSharding(mesh, P())
    if _has_masked_parts(state_shape.opt_state):  # optax.multi_transform (one optimizer per trained part)
        opt = _shardings_by_path(state_shape.opt_state, state_shape.params, param_sharding, rep)
    else:
        opt = optax.tree_map_params(tx, lambda _p, s: s, state_shape.opt_state, param_sharding,
                                    transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    frozen = None
    if state_shape.frozen is not None:
        frozen = frozen_sharding if frozen_sharding is not None else jax.tree.map(lambda _: rep, state_shape.frozen)
    # the loss scale gets one sharding for its whole subtree (jmp's classes reject non-array leaves)
    return TrainState(step=rep, params=param_sharding, opt_state=opt, loss_scale=rep, rng=rep, frozen=frozen)


def _has_masked_parts(opt_state) -> bool:
    masked = optax.MaskedNode
    return any(isinstance(x, masked) for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, masked)))


def _shardings_by_path(opt_shape, params_shape, param_sharding, rep):
    """Optimizer-state shardings for a state of masked per-part optimizers (which ``optax.tree_map_params`` cannot
    map): a leaf whose key path ends with a param's full path and has its shape is sharded like that param,
    every other leaf (counts, the other part's empty nodes) replicated."""
    shardings = jax.tree.map(lambda _p, s: s, params_shape, param_sharding,
                             is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {tuple(map(str, path)): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(jax.tree_util.tree_leaves_with_path(params_shape), jax.tree.leaves(
                   shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))}
    depth = {len(k) for k in by_path}

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for n in depth:
            found = by_path.get(keys[-n:])
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_shape)


def abstract_with_shardings(shape_tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying their sharding; ``shardings`` may be a prefix of the tree."""
    def leafwise(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub)

    return jax.tree.map(leafwise, shardings, shape_tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def init_train_state(config: ModelConfig, tx: optax.GradientTransformation, *, seed: int, policy: Policy | str,
                     loss_scale: str = "auto", params=None, mesh=None, param_sharding=None, frozen=None,
                     frozen_sharding=None):
    """A fresh ``TrainState`` placed on ``mesh`` (params from ``params`` or MiniMind's init drawn from ``seed``;
    ``frozen``: params that are not trained, placed per ``frozen_sharding``), and its shardings.
    Returns ``(state, shardings)``."""
    policy = get_policy(policy)
    if params is None:
        params = init_params(config, jax.random.key(seed), policy)
    kind = loss_scale if loss_scale != "auto" else ("dynamic" if policy.needs_loss_scaling else "none")
    scale = make_loss_scale(kind)
    rng = jax.random.key_data(jax.random.key(seed + 1))

    def make(params, frozen):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          loss_scale=scale, rng=rng, frozen=frozen)

    shape = jax.eval_shape(make, params, frozen)
    if mesh is None:
        return make(params, frozen), None
    shardings = state_shardings(shape, param_sharding, mesh, tx, frozen_sharding)
    params = _put(params, param_sharding)
    frozen = None if frozen is None else _put(frozen, shardings.frozen)
    state = jax.jit(make, out_shardings=shardings, donate_argnums=(0, 1))(params, frozen)
    return state, shardings


def _put(tree, sharding):
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding, donate=True)  # no second host copy
    return jax.tree.map(lambda x, s: _place(x, s), tree, sharding)


def _place(x, sharding):
    """A host or single-device array -> a global array with ``sharding`` (every process holds the same values)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def jit_train_step(train_step, state_sharding, batch_sharding, mesh):
    """``jax.jit`` with explicit in / out shardings and the state donated."""
    rep = NamedSharding(mesh, P())
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, rep),
                   donate_argnums=0)
