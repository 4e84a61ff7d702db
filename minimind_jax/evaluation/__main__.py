"""lm-evaluation-harness's command line with the ``minimind-jax`` model registered (lm-eval's own ``lm_eval``
command has no plugin mechanism for models in version 0.4):

    python -m minimind_jax.evaluation --model minimind-jax --model_args pretrained=CKPT --tasks arc_easy
"""

import minimind_jax.evaluation.harness  # noqa: F401  (registers minimind-jax)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
