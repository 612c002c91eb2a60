"""Time per GRPO step: `trl.GRPOTrainer` vs `BebopGRPOTrainer` without a head vs with a trained head.

All three train SmolLM2-135M-Instruct (the embedded model) on the same reasoning-gym prompts with the same seed,
batch and completion length. The runs alternate (plain, no head, head, plain, ...) for `--repeats` rounds so that
machine noise hits them alike; the table gives the median step time of each (first step of every run dropped: it
includes start-up costs), the speed-up over plain GRPO, and the head's acceptance and the policy's entropy per step.

    python examples/train_mtp.py --output_dir outputs/smollm2-head --use_cpu --max_steps 300
    python benchmarks/bench_grpo.py --mtp-head outputs/smollm2-head
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from trl import GRPOConfig, GRPOTrainer

from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_reward


RUNS = ("trl GRPOTrainer", "bebop, no head", "bebop, head")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtp-head", required=True, help="head trained for SmolLM2 (examples/train_mtp.py)")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--draft-sampling", default="probabilistic", choices=["probabilistic", "greedy"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/grpo.json")
    return parser.parse_args()


def run(name: str, args: argparse.Namespace, dataset, reward) -> dict:
    policy, tokenizer = load_smollm2()
    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    if name == RUNS[0]:
        trainer = GRPOTrainer(
            policy, reward, args=GRPOConfig(**settings), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        head = args.mtp_head if name == RUNS[2] else None
        config = BebopGRPOConfig(
            **settings,
            mtp_head=head,
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sampling=args.draft_sampling,
        )
        trainer = BebopGRPOTrainer(policy, reward, args=config, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    steps = [entry for entry in trainer.state.log_history if "step_time" in entry]
    return {
        "wall_seconds": wall,
        "step_time": [entry["step_time"] for entry in steps],
        "entropy": [entry.get("entropy") for entry in steps],
        "completion_length": [entry.get("completions/mean_length") for entry in steps],
        "acceptance_rate": [entry.get("rollout/acceptance_rate") for entry in steps],
        "mean_accepted_length": [entry.get("rollout/mean_accepted_length") for entry in steps],
        "rollout_share_of_step_time": [entry.get("rollout/share_of_step_time") for entry in steps],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.mtp_head):
        raise SystemExit(f"--mtp-head {args.mtp_head} is not a folder: train one with examples/train_mtp.py first.")
    task_config = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1) if args.task == "basic_arithmetic" else {}
    prompts_needed = args.steps * args.batch_size // args.num_generations
    dataset = reasoning_gym_dataset(args.task, max(prompts_needed, 8), seed=args.seed, **task_config)
    reward = reasoning_gym_reward(args.task)

    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for repeat in range(args.repeats):
        for name in RUNS:
            results[name].append(run(name, args, dataset, reward))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {results[name][-1]['step_time']}", flush=True)

    summary = summarise(results, args.batch_size)
    print_table(summary, args)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "summary": summary, "runs": results}, f, indent=2)
    print(f"wrote {args.output}")


def summarise(results: dict[str, list[dict]], batch_size: int) -> dict[str, dict]:
    summary = {}
    for name, runs in results.items():
        step_times = [t for r in runs for t in r["step_time"][1:]]
        per_step = {
            key: [statistics.fmean(v) for v in zip(*(r[key] for r in runs), strict=True) if None not in v]
            for key in ("entropy", "acceptance_rate", "mean_accepted_length", "completion_length")
        }
        shares = [s for r in runs for s in r["rollout_share_of_step_time"][1:] if s is not None]
        # Runs sample different completions: step time per generated token corrects for their lengths.
        per_token = [
            t / (length * batch_size)
            for r in runs
            for t, length in zip(r["step_time"][1:], r["completion_length"][1:], strict=True)
        ]
        summary[name] = {
            "median_step_seconds": statistics.median(step_times),
            "median_ms_per_completion_token": 1000 * statistics.median(per_token),
            "rollout_share_of_step_time": statistics.fmean(shares) if shares else None,
            **per_step,
        }
    plain = summary[RUNS[0]]["median_step_seconds"]
    plain_per_token = summary[RUNS[0]]["median_ms_per_completion_token"]
    for entry in summary.values():
        entry["speedup_over_trl"] = plain / entry["median_step_seconds"]
        entry["per_token_speedup_over_trl"] = plain_per_token / entry["median_ms_per_completion_token"]
    return summary


def print_table(summary: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\nGRPO on SmolLM2-135M, batch {args.batch_size}, {args.max_completion_length} new tokens, "
        f"T={args.temperature}, k={args.num_speculative_tokens} ({args.draft_sampling})"
    )
    print(
        "| run | median s/step | speed-up vs trl | ms/step per completion token | speed-up per token | rollout share "
        "| acceptance per step | entropy per step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        share = f"{s['rollout_share_of_step_time']:.2f}" if s["rollout_share_of_step_time"] is not None else "-"
        acceptance = ", ".join(f"{a:.2f}" for a in s["acceptance_rate"]) or "-"
        entropy = ", ".join(f"{e:.2f}" for e in s["entropy"])
        print(
            f"| {name} | {s['median_step_seconds']:.2f} | {s['speedup_over_trl']:.2f}x | "
            f"{s['median_ms_per_completion_token']:.1f} | {s['per_token_speedup_over_trl']:.2f}x | {share} | "
            f"{acceptance} | {entropy} |"
        )


if __name__ == "__main__":
    main()
