"""Mixed precision: a small ``Policy`` (param / compute / output dtypes) and loss scaling.

Presets (``get_policy(name)``):

=============  ===========  =============  ============  ==========================================
name           params       compute        output        use
=============  ===========  =============  ============  ==========================================
``fp32``       float32      float32        float32       reference runs, CPU (matmuls at ``highest``)
``tf32``       float32      float32        float32       float32 with TF32 matmuls on NVIDIA GPUs
``bf16``       float32      bfloat16       float32       training on GPUs (the default there)
``fp16``       float32      float16        float32       training on older GPUs; needs loss scaling
``bf16-params``bfloat16     bfloat16       bfloat16      inference with half the weight memory
=============  ===========  =============  ============  ==========================================

Whatever the compute dtype, RMSNorm, the attention and router softmaxes and the loss run in float32
(the same ops PyTorch's autocast keeps in float32); the model modules do that, not the policy.

Loss scaling uses jmp's ``NoOpLossScale`` / ``StaticLossScale`` / ``DynamicLossScale`` (pytrees, so they
live in the train state) and ``optax.apply_if_finite`` (``skip_nonfinite``, applied by ``guarded_update``)
to skip updates whose gradients overflowed. The
order inside a train step is: scale the loss -> grad -> ``unscale`` -> finiteness check ->
``adjust`` the scale -> clip -> optimizer (the clip and the optimizer sit inside the optax chain that
``skip_nonfinite`` wraps, so clipping always sees unscaled gradients).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jmp
import optax

NoOpLossScale = jmp.NoOpLossScale
StaticLossScale = jmp.StaticLossScale


@jax.tree_util.register_pytree_node_class
class DynamicLossScale(jmp.DynamicLossScale):
    """``jmp.DynamicLossScale`` that keeps ``min_loss_scale`` through pytree flattening.

    jmp 0.0.4 leaves ``min_loss_scale`` out of ``tree_flatten``, so every ``jax.jit`` / ``tree.map`` /
    checkpoint round trip silently reset the floor to 1. Here it is a pytree leaf like the scale.
    """

    def tree_flatten(self):
        return (self.loss_scale, self.counter, self.min_loss_scale), (self.period, self.factor)

    @classmethod
    def tree_unflatten(cls, meta, data):
        # No __init__: jmp's __post_init__ checks that loss_scale is floating, and unflattening must accept any
        # leaves (orbax maps the state to None / save-args placeholders, jax to tracers and ShapeDtypeStructs).
        obj = object.__new__(cls)
        names = ("loss_scale", "counter", "min_loss_scale", "period", "factor")
        for name, value in zip(names, (*data, *meta)):
            object.__setattr__(obj, name, value)
        return obj

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        new = super().adjust(grads_finite)  # a plain jmp.DynamicLossScale
        return DynamicLossScale(new.loss_scale, new.counter, new.period, new.factor, new.min_loss_scale)


LossScale = jmp.NoOpLossScale | jmp.StaticLossScale | jmp.DynamicLossScale


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite (a bool scalar; True for an empty tree).

    Why not ``jmp.all_finite``: its boolean ``all`` reductions run at a fraction of memory speed on
    XLA:CPU (62 ms over minimind3's 64M gradients, against 15 ms for a float sum). Here each leaf is one
    float sum of ``x * 0``, which is 0 for finite elements and NaN for inf / NaN ones.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.array(True)
    total = sum(jnp.sum(x.astype(jnp.float32) * 0.0) for x in leaves)
    return jnp.isfinite(total)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes at the model's boundaries: params are stored in ``param_dtype``, cast to ``compute_dtype``
    where they are used, and the logits come out in ``output_dtype``.

    ``matmul_precision`` (``jax.default_matmul_precision`` around the model; ``None``: the backend's
    default) is ``highest`` for ``fp32``: on NVIDIA GPUs the default precision of a float32 dot is TF32
    (10-bit mantissa), so float32 would not mean float32 there. ``tf32`` opts into TF32 by name. On CPU
    float32 dots are float32 whatever the setting."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    name: str = "custom"
    matmul_precision: str | None = None

    def cast_to_param(self, tree):
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return _cast_floating(tree, self.output_dtype)

    @property
    def needs_loss_scaling(self) -> bool:
        return jnp.dtype(self.compute_dtype) == jnp.float16

    def __str__(self) -> str:
        names = [jnp.dtype(d).name for d in (self.param_dtype, self.compute_dtype, self.output_dtype)]
        precision = f", matmul={self.matmul_precision}" if self.matmul_precision else ""
        return f"{self.name} (params={names[0]}, compute={names[1]}, output={names[2]}{precision})"


POLICIES: dict[str, Policy] = {
    "fp32": Policy(jnp.float32, jnp.float32, jnp.float32, "fp32", "highest"),
    "tf32": Policy(jnp.float32, jnp.float32, jnp.float32, "tf32", "tensorfloat32"),
    "bf16": Policy(jnp.float32, jnp.bfloat16, jnp.float32, "bf16"),
    "fp16": Policy(jnp.float32, jnp.float16, jnp.float32, "fp16"),
    "bf16-params": Policy(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, "bf16-params"),
}

# MiniMind's --dtype flag names the autocast dtype; these are the policies its users expect.
DTYPE_FLAG_TO_POLICY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def get_policy(policy: str | Policy) -> Policy:
    """A preset by name (``fp32``, ``tf32``, ``bf16``, ``fp16``, ``bf16-params``; MiniMind's ``--dtype`` names
    ``float32`` / ``bfloat16`` / ``float16`` also work) or a ``Policy`` unchanged."""
    if isinstance(policy, Policy):
        return policy
    name = DTYPE_FLAG_TO_POLICY.get(policy, policy)
    if name not in POLICIES:
        raise ValueError(f"unknown precision policy {policy!r}; choose one of {', '.join(POLICIES)} "
                         f"(or {', '.join(DTYPE_FLAG_TO_POLICY)})")
    return POLICIES[name]


def _cast_floating(tree, dtype):
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return jnp.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


# --------------------------------------------------------------------------------------- loss scaling
DYNAMIC_INITIAL_SCALE = 2.0**15
DYNAMIC_PERIOD = 2000
DYNAMIC_FACTOR = 2
DYNAMIC_MIN_SCALE = 1.0


def make_loss_scale(kind: str = "dynamic", *, initial: float = DYNAMIC_INITIAL_SCALE,
                    period: int = DYNAMIC_PERIOD, factor: int = DYNAMIC_FACTOR,
                    min_scale: float = DYNAMIC_MIN_SCALE) -> LossScale:
    """``none``; ``static`` (a fixed ``initial``); ``dynamic``: start at ``initial`` (2**15), multiply by
    ``factor`` after ``period`` (2000) finite steps in a row, divide by ``factor`` on a non-finite
    gradient (that step's update is skipped), never below ``min_scale``."""
    if kind == "none":
        return jmp.NoOpLossScale()
    if kind == "static":
        return jmp.StaticLossScale(jnp.float32(initial))
    if kind == "dynamic":
        return DynamicLossScale(jnp.float32(initial), counter=jnp.zeros((), jnp.int32), period=period,
                                factor=factor, min_loss_scale=jnp.float32(min_scale))
    raise ValueError(f"unknown loss scale {kind!r}; choose none, static or dynamic")


def default_loss_scale(policy: str | Policy) -> LossScale:
    """Dynamic scaling for float16 compute, none otherwise (bf16 has float32's exponent range)."""
    return make_loss_scale("dynamic" if get_policy(policy).needs_loss_scaling else "none")


def current_scale(loss_scale: LossScale) -> jax.Array:
    """The scale as a float32 scalar (1 for no scaling), for logging."""
    return jnp.asarray(loss_scale.loss_scale, jnp.float32)


def scaled_value_and_grad(loss_fn: Callable[..., Any], loss_scale: LossScale, *, has_aux: bool = False):
    """``jax.value_and_grad`` of ``loss_fn`` with the loss multiplied by the loss scale and the gradients
    divided by it again. Returns ``f(params, *args) -> (value, grads, finite)``; ``value`` is unscaled,
    ``finite`` says whether every gradient is finite (if not, skip the update and ``adjust`` the scale)."""

    def scaled(params, *args):
        out = loss_fn(params, *args)
        loss, aux = out if has_aux else (out, None)
        return loss_scale.scale(loss), (loss, aux)

    def f(params, *args):
        (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(params, *args)
        grads = loss_scale.unscale(grads)
        finite = all_finite(grads)
        return ((loss, aux) if has_aux else loss), grads, finite

    return f


class _SkipNonFinite(optax.GradientTransformationExtraArgs):
    """``optax.apply_if_finite``'s transformation, remembering the transformation it wraps (``inner``)."""


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``tx`` so that an update with a non-finite gradient is skipped (params and optimizer state
    unchanged). The wrapper's state counts skipped steps (``total_notfinite``). Never gives up: the
    dynamic loss scale, not this wrapper, decides how to recover.

    This is ``optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)``; the result also keeps ``tx`` as
    ``.inner`` so that :func:`guarded_update` can put the update and ``apply_updates`` under one condition.
    """
    wrapped = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    out = _SkipNonFinite(wrapped.init, wrapped.update)
    out.inner = tx
    return out


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params, finite: jax.Array):
    """``tx.update`` then ``optax.apply_updates``: returns ``(new params, new optimizer state)``.

    For a :func:`skip_nonfinite` transformation the whole update sits in one ``lax.cond`` on ``finite``
    (the caller's finiteness check of ``grads``), with the same result and state as calling ``tx.update``.
    Why: ``apply_if_finite`` conds over the optimizer update alone, so XLA cannot fuse it with
    ``apply_updates`` and materialises every update; a minimind3 CPU step spent ~150 ms on that, against
    ~40 ms for this.
    """
    inner = getattr(tx, "inner", None)
    if inner is None:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def apply(args):
        params, inner_state = args
        updates, inner_state = inner.update(grads, inner_state, params)
        return optax.apply_updates(params, updates), inner_state

    params, inner_state = jax.lax.cond(finite, apply, lambda args: args, (params, opt_state.inner_state))
    return params, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(opt_state.notfinite_count)),
        last_finite=jnp.asarray(finite, jnp.bool_),
        total_notfinite=jnp.where(finite, opt_state.total_notfinite, optax.safe_increment(opt_state.total_notfinite)),
        inner_state=inner_state)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """PyTorch's ``clip_grad_norm_`` (what MiniMind calls): every gradient times
    ``min(1, max_norm / (global_norm + 1e-6))``.

    Why not ``optax.clip_by_global_norm``: it selects between ``g`` and ``g / norm * max_norm``, a
    division per element that XLA:CPU does not fuse well (+115 ms a minimind3 step); here it is one
    scalar multiply that fuses into the optimizer's pass.
    """
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def skipped_steps(opt_state) -> jax.Array:
    """Total skipped (non-finite) steps recorded by ``skip_nonfinite``'s state."""
    return opt_state.total_notfinite


def skipped_in_a_row(opt_state) -> jax.Array:
    """The skipped steps since the last finite one (``skip_nonfinite``'s state)."""
    return opt_state.notfinite_count
