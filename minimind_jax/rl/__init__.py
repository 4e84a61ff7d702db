"""Reinforcement learning from rewards (MiniMind-3's GRPO / CISPO and PPO): the objectives
(:mod:`minimind_jax.rl.objectives`) and the reward functions (:mod:`minimind_jax.rl.rewards`)."""
