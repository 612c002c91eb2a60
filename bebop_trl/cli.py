"""The `bebop-trl` command."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bebop-trl` console script."""
    parser = argparse.ArgumentParser(prog="bebop-trl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="Run the end-to-end job (head training, measured acceptance and speed-up, a short GRPO run) and write "
        "a report; offline on the embedded SmolLM2-135M-Instruct by default.",
    )
    quickstart.add_argument(
        "--fast", action="store_true", help="A smoke run of every stage with tiny budgets (about 3 minutes)."
    )
    quickstart.add_argument(
        "--output-dir", default="outputs/quickstart", help="Where the report, plots, heads and runs go."
    )
    quickstart.add_argument("--seed", type=int, default=0, help="Seed of the prompts, sampling and training.")
    quickstart.add_argument(
        "--model",
        default=None,
        help="Hub id or folder of a causal LM to run on instead of the embedded model (loaded in float32, on the "
        "GPU if there is one). It has no shipped head: the e2e_tv head trained in the run drafts the later stages.",
    )
    quickstart.add_argument(
        "--task",
        default="basic_arithmetic",
        help="reasoning-gym task (default: basic_arithmetic with 2 one-digit terms, as the shipped head was "
        "trained on; other tasks use their default difficulty).",
    )

    quickstart.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); on a machine busy with other jobs, fewer "
        "threads than cores can be faster.",
    )

    commands.add_parser(
        "vllm-serve",
        add_help=False,
        help="Start TRL's vLLM server with an MTP head as drafter (GRPO server mode); --help lists its options.",
    )

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm-serve"]:
        from .vllm_serve import main as vllm_serve

        vllm_serve(argv[1:])
        return 0
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        import torch

        from .quickstart import QuickstartSettings, run_quickstart

        if args.threads is not None:
            if args.threads < 1:
                parser.error(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)

        run_quickstart(
            QuickstartSettings.create(
                fast=args.fast, output_dir=args.output_dir, seed=args.seed, model=args.model, task=args.task
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
