"""The `bebop-trl` command."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bebop-trl` console script."""
    parser = argparse.ArgumentParser(prog="bebop-trl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser("quickstart", help="Run the end-to-end job on the embedded default model.")
    quickstart.add_argument("--fast", action="store_true", help="A short smoke run (a few minutes).")
    quickstart.add_argument("--output-dir", default="outputs/quickstart", help="Where the report and heads go.")
    quickstart.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "quickstart":
        from .quickstart import run_quickstart

        run_quickstart(output_dir=args.output_dir, fast=args.fast, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
