"""lm-evaluation-harness's command line with the ``minimind-jax`` model registered (lm-eval's own ``lm_eval``
command has no plugin mechanism for models in version 0.4); also the ``minimind-lm-eval`` command:

    python -m minimind_jax.evaluation --model minimind-jax --model_args pretrained=CKPT --tasks arc_easy
"""

import sys

try:
    import minimind_jax.evaluation.harness  # noqa: F401  (registers minimind-jax)
    from lm_eval.__main__ import cli_evaluate
except ImportError as e:  # the eval extra is not installed
    cli_evaluate, MISSING = None, e


def main() -> int:
    """lm-eval's ``cli_evaluate`` (it reads ``sys.argv``); without lm-eval a one-line error and exit code 2."""
    if cli_evaluate is None:
        print(f"error: needs lm-evaluation-harness: pip install -e '.[eval]' ({MISSING})", file=sys.stderr)
        return 2
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
