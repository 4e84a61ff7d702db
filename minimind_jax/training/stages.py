"""Training stages: each is a loss, the data it reads and its defaults, plugged into the one train step.

A stage's ``loss(apply, params, frozen, micro_batch, rng)`` returns ``(loss_sum, aux_loss, metrics)``:

* ``loss_sum`` — the float32 sum of the per-token (or per-example) losses of the micro-batch. The train step
  divides it by the stage's ``normalizer(batch)`` taken over the *whole* optimizer step (all micro-batches
  of gradient accumulation, all devices), so that accumulating k micro-batches gives exactly the gradient of
  one k-times larger batch, whatever the number of trained tokens in each micro-batch.
* ``aux_loss`` — added as is (MoE load balancing), averaged over the micro-batches as MiniMind does.
* ``metrics`` — float32 scalars, averaged over the micro-batches.

``apply(params, input_ids, rng)`` runs the model in training mode under the run's precision policy and returns
its ``ModelOutput``; ``frozen`` carries params that are not trained (a DPO reference, a distillation teacher,
a LoRA base model), ``None`` for pretrain and SFT.

The stages (``build_stage(cfg, ...)`` makes one from a ``TrainConfig``):

* ``pretrain``, ``sft``: token-mean next-token CE over the trained labels.
* ``reason``: SFT on ``<think>...</think><answer>...</answer>`` replies; the data carries ``loss_weights``
  (``special_token_weight`` on the trained tag tokens, 1 on the other trained tokens, 0 elsewhere) and the loss
  is ``sum(w * CE) / sum(w)`` over the step.
* ``dpo``: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` per pair, with masked sequence log-prob
  sums over the assistant tokens; the reference (``frozen``: the initial weights) runs without gradients;
  mean over the pairs of the step; metrics: reward accuracy, margin, chosen / rejected rewards.
* ``distill``: ``alpha * CE + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per trained
  token, token mean (MiniMind's ``batchmean`` over the masked tokens); the teacher (``frozen``) runs in its own
  policy (bf16 by default) without gradients.
* ``lora``: the SFT loss of the adapted model (``params`` = adapters, ``frozen`` = base; see
  :mod:`minimind_jax.lora`).
* ``grpo``: GRPO / CISPO (``loss_type``) on rollouts of the current policy (:mod:`minimind_jax.rl.grpo`): the
  data are prompts (``rlaif.jsonl``), ``prepare`` samples ``num_generations`` completions of each, scores them
  (``rewards``) and computes group advantages; the loss is MiniMind's per-token policy loss + ``beta`` k3 KL to
  the frozen reference, mean over a sequence's tokens then over the sequences.
* ``ppo``: PPO (:mod:`minimind_jax.rl.ppo`): one rollout per prompt, old log-probs / reference log-probs / critic
  values once at rollout time, GAE advantages; ``ppo_update_iters`` passes of the clipped policy + value loss
  (+ k3 KL to the reference) inside one train step, stopped early on the approximate KL.
* ``reward``: a reward model (:mod:`minimind_jax.rl.reward_model`: the model + a scalar head) trained on DPO
  pairs with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``; grpo's ``reward_model`` reward.
* ``agent``: the same loss on multi-turn tool-use trajectories (``agent_rl.jsonl``, :mod:`minimind_jax.rl.agent`),
  over the tokens the model generated (tool turns carry no loss), rewarded by MiniMind's trajectory reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np

from minimind_jax.data.packing import PACK_KEYS, reads_packed_rows
from minimind_jax.data.prepared import is_prepared_dir
from minimind_jax.data.prepared_chat import open_prepared
from minimind_jax.data.rl_prompts import RLPromptSource
from minimind_jax.lora import LoraConfig
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.rl import agent, grpo, ppo, reward_model
from minimind_jax.training.config import TrainConfigError
from minimind_jax.training.losses import (  # noqa: F401  (re-exported: the stage losses)
    token_cross_entropy,
    count_trained_tokens,
    lm_loss,
    weighted_lm_loss,
    sum_of_weights,
    sequence_log_probs,
    dpo_rewards,
    dpo_pairs,
    make_dpo_loss,
    count_pairs,
    distill_terms,
    make_distill_loss,
    make_lora_loss,
)
from minimind_jax.weights import WeightsError


# ------------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    data_stage: str  # which data pipeline reads its files (pretrain | sft | dpo)
    loss: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    normalizer: Callable[[Mapping[str, jax.Array]], jax.Array]
    batch_keys: tuple[str, ...] = ("input_ids", "labels")
    sequences_per_example: int = 1  # DPO: a chosen and a rejected sequence (tokens/s counts both)
    rows_per_example: int = 1  # rows of the step's batch per data example (GRPO: its rollouts), split over devices
    # the keys read from the data pipeline, when they differ from batch_keys (e.g. prompts for a rollout)
    data_keys: tuple[str, ...] | None = None
    # host-side batch builder run before each jitted step: prepare(data_batch, state, step) ->
    # (batch with batch_keys, {metric: float}); data_batch holds numpy arrays [accumulation, batch, ...] of
    # data_keys, state is the run's current TrainState (params on the devices, frozen models in state.frozen);
    # its metrics join the step's row in metrics.jsonl. None: the data batch is the training batch.
    prepare: Callable[..., tuple[dict[str, np.ndarray], dict[str, float]]] | None = None
    # the tokens a (host) batch trains on, for tokens/s; None: batch x accumulation x max_seq_len x sequences
    count_tokens: Callable[[Mapping[str, np.ndarray]], int] | None = None
    describe: str | None = None  # what one micro-batch is, for the run's first log line (default: its tokens)
    # optimizer updates per batch inside the one train step (PPO's passes over a rollout batch; 1: one update);
    # the loss sees the pass number as micro["update_pass"] when > 1
    update_passes: int = 1
    # stop_passes(metrics of a pass, averaged over the micro-batches) -> bool array: that pass and the later ones
    # do not update (PPO's KL early stop); None: every pass updates
    stop_passes: Callable[[Mapping[str, jax.Array]], jax.Array] | None = None


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", "pretrain", lm_loss, count_trained_tokens),
    "sft": Stage("sft", "sft", lm_loss, count_trained_tokens),
    "reason": Stage("reason", "sft", weighted_lm_loss, sum_of_weights, ("input_ids", "labels", "loss_weights")),
}
DPO_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def get_stage(name: str) -> Stage:
    """A stage that needs no settings (pretrain, sft, reason); :func:`build_stage` makes any stage."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)} (or use build_stage)")
    return STAGES[name]


def eval_apply(config, policy) -> Callable:
    """``apply(params, input_ids, **kwargs)`` in evaluation mode (no dropout, no aux loss) under ``policy``."""
    model = MiniMindLM(config, policy)
    return lambda params, input_ids, **kwargs: model.apply({"params": params}, input_ids, **kwargs)


def build_stage(cfg, model_config=None, policy=None, teacher_config=None, tokenizer=None) -> Stage:
    """The stage ``cfg.stage`` with ``cfg``'s hyperparameters (DPO beta, distillation alpha / T / teacher model,
    LoRA scale, the RL settings; RL stages also need the ``tokenizer``)."""
    name = cfg.stage
    if name == "pretrain" and cfg.document_mask and reads_packed_rows(cfg.data_path):  # attend within documents
        return dataclasses.replace(STAGES[name], batch_keys=STAGES[name].batch_keys + PACK_KEYS)
    if name in STAGES:
        return STAGES[name]
    if name == "dpo":
        return Stage("dpo", "dpo", make_dpo_loss(cfg.dpo_beta, eval_apply(model_config, policy)), count_pairs,
                     DPO_KEYS, sequences_per_example=2)
    if name == "distill":
        if teacher_config is None:
            raise ValueError("the distill stage needs the teacher's model config")
        loss = make_distill_loss(cfg.distill_alpha, cfg.distill_temperature,
                                 eval_apply(teacher_config, cfg.teacher_policy))
        return Stage("distill", "sft", loss, count_trained_tokens)
    if name == "lora":
        scale = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets).scale
        return Stage("lora", "sft", make_lora_loss(scale), count_trained_tokens)
    if name == "grpo":
        return grpo_stage(cfg, model_config, policy, tokenizer)
    if name == "agent":
        return agent_stage(cfg, model_config, policy, tokenizer)
    if name == "ppo":
        return ppo_stage(cfg, model_config, policy, tokenizer)
    if name == "reward":
        return Stage("reward", "dpo", reward_model.make_loss(), count_pairs, DPO_KEYS, sequences_per_example=2)
    raise ValueError(f"unknown stage {name!r}")


def prompt_source(cfg, kind: str):
    """The RL records (messages, tools, gt) the rewards read back by ``record_index``: from the jsonl files, or
    the prompts a prepared directory stores (``scripts/prepare_data.py --stage rlaif|agent``)."""
    paths = [cfg.data_path] if isinstance(cfg.data_path, str) else list(cfg.data_path)
    if len(paths) == 1 and is_prepared_dir(paths[0]):
        return open_prepared(paths[0], kind).prompts()
    return RLPromptSource(cfg.data_path, kind, skip_bad_lines=cfg.skip_bad_lines)


def grpo_settings(cfg) -> grpo.GRPOSettings:
    return grpo.GRPOSettings(num_generations=cfg.num_generations, max_new_tokens=cfg.max_gen_len,
                             max_prompt_len=cfg.max_seq_len, temperature=cfg.rollout_temperature,
                             top_k=cfg.rollout_top_k, top_p=cfg.rollout_top_p, loss_type=cfg.loss_type,
                             beta=cfg.kl_beta, epsilon=cfg.clip_epsilon, epsilon_high=cfg.clip_epsilon_high)


def grpo_stage(cfg, model_config, policy, tokenizer) -> Stage:
    """GRPO / CISPO: prompts in, rollouts + rewards + advantages made by ``prepare``, the policy loss inside the step."""
    if tokenizer is None:
        raise ValueError("the grpo stage needs the tokenizer (rollouts are decoded and scored as text)")
    settings = grpo_settings(cfg)
    prepare = grpo.RolloutStep(settings, model_config, policy.name, tokenizer,
                               prompt_source(cfg, "rlaif"),
                               dict(cfg.rewards), cfg.seed, tokenizer.eos_token_id, tokenizer.pad_token_id or 0,
                               extra_rewards=extra_rewards(cfg, tokenizer, policy))
    return Stage("grpo", "rlaif", grpo.make_stage_loss(settings, model_config, policy, tokenizer.eos_token_id),
                 grpo.count_sequences, grpo.BATCH_KEYS, sequences_per_example=settings.num_generations,
                 rows_per_example=settings.num_generations, data_keys=grpo.PROMPT_KEYS, prepare=prepare,
                 count_tokens=grpo.count_tokens,
                 describe=f"{cfg.batch_size} prompts x {settings.num_generations} rollouts (prompt <= "
                          f"{cfg.max_seq_len}, <= {cfg.max_gen_len} new tokens)")


def extra_rewards(cfg, tokenizer, policy) -> dict:
    """The rewards that need a model (the configured reward model: ours or a Hugging Face one), by name; a
    directory that cannot be read is a configuration error naming it."""
    if not cfg.rewards.get("reward_model"):
        return {}
    try:
        return {"reward_model": reward_model.open_reward_model(cfg.reward_model, tokenizer, policy.name)}
    except WeightsError as e:
        raise TrainConfigError(str(e)) from None


def ppo_stage(cfg, model_config, policy, tokenizer) -> Stage:
    """PPO: prompts in; rollouts, rewards, the rollout-time forward pass and GAE made by ``prepare``; the passes of
    the policy + value loss inside the step."""
    if tokenizer is None:
        raise ValueError("the ppo stage needs the tokenizer (rollouts are decoded and scored as text)")
    settings = ppo.PPOSettings(clip=cfg.clip_epsilon, value_clip=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                               kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam)
    eos = tokenizer.eos_token_id
    prepare = ppo.PPORolloutStep(dataclasses.replace(grpo_settings(cfg), num_generations=1), model_config,
                                 policy.name, tokenizer,
                                 prompt_source(cfg, "rlaif"),
                                 dict(cfg.rewards), cfg.seed, eos, tokenizer.pad_token_id or 0,
                                 extra_rewards=extra_rewards(cfg, tokenizer, policy), ppo=settings)
    return Stage("ppo", "rlaif", ppo.make_stage_loss(settings, model_config, policy, eos), ppo.make_normalizer(eos),
                 ppo.BATCH_KEYS, data_keys=grpo.PROMPT_KEYS, prepare=prepare, count_tokens=grpo.count_tokens,
                 describe=f"{cfg.batch_size} prompts x 1 rollout (prompt <= {cfg.max_seq_len}, <= {cfg.max_gen_len} "
                          f"new tokens), {cfg.ppo_update_iters} update passes",
                 update_passes=cfg.ppo_update_iters, stop_passes=ppo.early_stop(cfg.early_stop_kl))


def agent_stage(cfg, model_config, policy, tokenizer) -> Stage:
    """Agentic RL: multi-turn rollouts with the mocked tools (:mod:`minimind_jax.rl.agent`), CISPO / GRPO loss on
    the generated tokens only."""
    if tokenizer is None:
        raise ValueError("the agent stage needs the tokenizer (tool calls are parsed from the decoded text)")
    settings = grpo_settings(cfg)
    prepare = agent.AgentRolloutStep(settings, model_config, policy.name, tokenizer,
                                     prompt_source(cfg, "agent"),
                                     cfg.seed, tokenizer.eos_token_id, tokenizer.pad_token_id or 0,
                                     max_turns=cfg.agent_max_turns, max_total_tokens=cfg.agent_max_total_tokens)
    return Stage("agent", "agent", grpo.make_stage_loss(settings, model_config, policy, tokenizer.eos_token_id),
                 grpo.count_sequences, agent.BATCH_KEYS, sequences_per_example=settings.num_generations,
                 rows_per_example=settings.num_generations, data_keys=grpo.PROMPT_KEYS, prepare=prepare,
                 count_tokens=grpo.count_tokens,
                 describe=f"{cfg.batch_size} tasks x {settings.num_generations} trajectories (<= "
                          f"{cfg.agent_max_turns} turns of <= {cfg.max_gen_len} new tokens, "
                          f"<= {cfg.agent_max_total_tokens} in all)")
