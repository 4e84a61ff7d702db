"""Scoring text with a model: per-token log-probabilities on the jitted forward pass (:mod:`.scoring`), the
lm-evaluation-harness model ``minimind-jax`` (:mod:`.harness`, needs the ``eval`` extra) and offline
multiple-choice task files (``tasks/``).

Importing :mod:`minimind_jax.evaluation.harness` registers ``minimind-jax`` in lm-eval's model registry;
``python -m minimind_jax.evaluation`` is lm-eval's command line with that model registered.
"""
