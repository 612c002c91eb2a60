"""The `bebop-trl` command."""

import argparse
import sys

from .modeling.vllm_export import DRAFT_SAMPLING_MODES


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

    verify = commands.add_parser(
        "verify-engine",
        help="Check that speculative sampling follows the policy's law (chi-square test on a tiny policy) and that "
        "the returned sampling log-probs are the policy's, on the torch engine and the installed vLLM; exits 1 if "
        "any case fails.",
    )
    verify.add_argument(
        "--engine",
        choices=("torch", "vllm", "all"),
        default=None,
        help="Engine to check (default: the torch engine, and vLLM if it is installed).",
    )
    verify.add_argument("--samples", type=int, default=8000, help="Completions sampled per case.")
    verify.add_argument(
        "--temperatures", type=float, nargs="+", default=[1.0, 0.7], help="Sampling temperatures to check."
    )
    verify.add_argument(
        "--draft-sampling",
        choices=DRAFT_SAMPLING_MODES,
        nargs="+",
        default=list(DRAFT_SAMPLING_MODES),
        help="Drafting modes to check.",
    )
    verify.add_argument(
        "--no-vllm-shims",
        action="store_true",
        help="Check the vLLM build as installed, without bebop-trl's fixes for builds known to sample the wrong law.",
    )
    verify.add_argument(
        "--draft-vocab",
        type=int,
        nargs="+",
        default=None,
        help="Token ids (0-7) of a reduced draft vocabulary for the head, e.g. 0 1 2 4 5 7 (default: all 8).",
    )
    verify.add_argument(
        "--layout",
        choices=("eagle", "eagle3"),
        default="eagle",
        help="Layout of the head: EAGLE-1 ('eagle') or EAGLE-3 ('eagle3', fusing the tiny policy's layers).",
    )
    verify.add_argument("--alpha", type=float, default=1e-3, help="A case fails when its p-value is at most this.")
    verify.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    verify.add_argument("--json", default=None, help="Also write the results to this JSON file.")

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
    if args.command == "verify-engine":
        return _verify_engine(args)
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


def _verify_engine(args) -> int:
    import importlib.util

    from .verification import format_table, verify_engine, write_json

    if args.engine is None:
        engines = ["torch"] + (["vllm"] if importlib.util.find_spec("vllm") is not None else [])
    else:
        engines = ["torch", "vllm"] if args.engine == "all" else [args.engine]
    checks = verify_engine(
        engines,
        num_samples=args.samples,
        temperatures=args.temperatures,
        draft_sampling_modes=args.draft_sampling,
        vllm_shims=not args.no_vllm_shims,
        alpha=args.alpha,
        seed=args.seed,
        draft_vocab=args.draft_vocab,
        layout=args.layout,
    )
    print(format_table(checks))
    if args.json:
        write_json(checks, args.json)
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} cases passed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
