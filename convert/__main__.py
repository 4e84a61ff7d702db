"""``python -m convert`` / ``minimind-convert``: the conversion CLI (subcommands land with the converter issue)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minimind-convert", description=__doc__)
    parser.add_argument("command", nargs="?", help="to-jax | to-torch | inspect (not implemented yet)")
    args = parser.parse_args(argv)
    print(f"minimind-convert: '{args.command}' is not available yet; the name mapping lives in "
          "convert.mapping (torch_to_params / params_to_torch).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
