"""Acceptance through RL: BebopGRPOTrainer on the quickstart task with a frozen or an online-updated head.

Three runs of `--steps` GRPO steps each, on the same prompts with the same seed:

- `ce-greedy`: the CE head `--ce-head` drafts greedily, frozen;
- `probabilistic-frozen`: the head `--head` drafts probabilistically, frozen (trained before RL only);
- `probabilistic-online`: the same head, trained on every round's rollouts with `--online-loss`.

The reward is the task's verifier on the completion's last number (`reasoning_gym_reward(answer_from=
"last_number")`), which the 135M policy earns often enough to learn from (`reward_signal.py`). Per step, from the
trainer's logs: reward, policy entropy, acceptance per position and accepted drafts per cycle. Per run: the
trainer's acceptance-entropy fit over all completions, with a 95% bootstrap interval of its slope from the fit's
points, and the acceptance over the first and the last `--window` steps. Acceptance moves with the policy's entropy
whatever the head, so whether a frozen head holds its acceptance is read at equal entropy: the last window's
acceptance against a line fitted (acceptance on entropy) to the first half of the steps, and the runs side by side
on steps grouped by entropy (0.5-nat bins), which needs no fitted line.

Every run checkpoints each `--save-steps` steps under `--work-dir/<run>` and resumes from its last checkpoint, so
rerunning the command continues an interrupted study. Results go to `--output` (JSON; runs of earlier invocations
stay in it, each with its own settings and wall time), a table to stdout and the plot of reward, entropy and
acceptance per step next to the JSON.

    nohup .venv/bin/python benchmarks/rl_acceptance.py --ce-head outputs/heads/ce --head outputs/heads/best \\
        --online-loss e2e_tv > outputs/logs/rl-acceptance.log 2>&1 &
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from study import bootstrap_slopes, interval
from transformers.trainer_utils import get_last_checkpoint

from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.ops import LOSS_TYPES
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_reward


RUNS = ("ce-greedy", "probabilistic-frozen", "probabilistic-online")
K = 3
WALL_SECONDS = "wall_seconds.json"
ENTROPY_BIN = 0.5  # nats
ENTROPY_TABLE = (1.0, 1.5, 2.0)  # the lower edges of the entropy bins that every run visits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ce-head", required=True, help="Head trained with ce (drafts greedily).")
    parser.add_argument("--head", required=True, help="The best head of the loss study (drafts probabilistically).")
    parser.add_argument("--online-loss", default="e2e_tv", choices=LOSS_TYPES)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="Completions per step.")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=10, help="Steps averaged at the start and the end of a run.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="outputs/rl_acceptance")
    parser.add_argument("--output", default="benchmarks/results/rl_acceptance.json")
    return parser.parse_args()


def read_json(path: str, default=None):
    """The JSON file's content, or `default` when there is no such file."""
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_config(args, run: str) -> BebopGRPOConfig:
    return BebopGRPOConfig(
        output_dir=os.path.join(args.work_dir, run),
        mtp_head=args.ce_head if run == "ce-greedy" else args.head,
        draft_sampling="greedy" if run == "ce-greedy" else "probabilistic",
        mtp_online_loss=args.online_loss if run == "probabilistic-online" else None,
        num_speculative_tokens=K,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        temperature=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
    )


def train(args, run: str) -> list[dict]:
    """Runs (or resumes, or finds finished) one run and returns its per-step log entries."""
    config = run_config(args, run)
    fit_file = os.path.join(config.output_dir, "acceptance_entropy_fit.json")
    steps_file = os.path.join(config.output_dir, "log_history.json")
    if os.path.isfile(steps_file) and os.path.isfile(fit_file):
        return read_json(steps_file)
    policy, tokenizer = load_smollm2()
    prompts = args.steps * args.batch_size // args.num_generations
    dataset = reasoning_gym_dataset("basic_arithmetic", prompts, seed=args.seed + 100, **DEFAULT_TASK_CONFIG)
    trainer = BebopGRPOTrainer(
        policy,
        reasoning_gym_reward("basic_arithmetic", answer_from="last_number"),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    last = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    # Every invocation (a resumed run has several) adds its wall time.
    timing_file = os.path.join(config.output_dir, WALL_SECONDS)
    timing = [
        *read_json(timing_file, []),
        {"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()},
    ]
    with open(timing_file, "w", encoding="utf-8") as f:
        json.dump(timing, f)
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    with open(steps_file, "w", encoding="utf-8") as f:
        json.dump(history, f, indent=2)
    return history


def summarise(args, run: str, history: list[dict]) -> dict:
    """Acceptance at the start and the end, and the slope of acceptance against entropy with its interval."""
    fit = read_json(os.path.join(args.work_dir, run, "acceptance_entropy_fit.json"))
    x, y, w = (np.asarray(fit["points"][name], dtype=np.float64) for name in ("entropy", "acceptance", "weight"))
    slopes = bootstrap_slopes({run: (x, y, w)}, len(x), seed=args.seed)[run]

    def mean_over(entries: list[dict], key: str) -> float:
        return float(np.mean([e[key] for e in entries if key in e]))

    start, end = history[: args.window], history[-args.window :]
    # Drift at equal entropy: a line through the first half's steps (acceptance against entropy) predicts the last
    # window's acceptance from its entropy; a head that falls behind the moving policy lands below it.
    early = history[: len(history) // 2]
    slope, intercept = np.polyfit(
        [e["entropy"] for e in early], [e["rollout/acceptance_position_1"] for e in early], deg=1
    )
    residual = float(np.mean([e["rollout/acceptance_position_1"] - (slope * e["entropy"] + intercept) for e in end]))
    return {
        "wall_seconds": read_json(os.path.join(args.work_dir, run, WALL_SECONDS)),
        "first_half_fit": {"slope": float(slope), "intercept": float(intercept)},
        "acceptance_position_1_end_minus_first_half_fit": residual,
        "fit": fit["fit"],
        "slope_interval_95": interval(slopes),
        "fit_points": len(x),
        **{
            f"{name}_{part}": mean_over(entries, key)
            for name, key in (
                ("reward", "reward"),
                ("entropy", "entropy"),
                ("acceptance_position_1", "rollout/acceptance_position_1"),
                ("accepted_drafts_per_cycle", "rollout/accepted_drafts_per_cycle"),
            )
            for part, entries in (("start", start), ("end", end))
        },
    }


def by_entropy(history: list[dict]) -> list[dict]:
    """Steps grouped by the policy's entropy: acceptance at equal entropy without a fitted line.

    Each bin compares runs, and within a run its first-half steps with its second-half steps: a frozen head that falls
    behind the moving policy accepts less late in the run than early at the same entropy.
    """
    bins = {}
    for entry in history:
        low = ENTROPY_BIN * int(entry["entropy"] // ENTROPY_BIN)
        bins.setdefault(low, []).append(entry)

    def means(entries: list[dict]) -> dict:
        keys = ("entropy", "rollout/acceptance_position_1", "rollout/accepted_drafts_per_cycle")
        return {
            "steps": len(entries),
            **{
                key.removeprefix("rollout/"): float(np.mean([e[key] for e in entries])) if entries else None
                for key in keys
            },
        }

    half = len(history) // 2
    return [
        {
            "entropy_low": low,
            "entropy_high": low + ENTROPY_BIN,
            **means(entries),
            "first_half": means([e for e in entries if e["step"] <= half]),
            "second_half": means([e for e in entries if e["step"] > half]),
        }
        for low, entries in sorted(bins.items())
    ]


def plot(histories: dict[str, list[dict]], path: str) -> None:
    figure = Figure(figsize=(13, 4))
    FigureCanvasAgg(figure)
    panels = (
        ("reward", "reward"),
        ("entropy", "policy entropy (nats)"),
        ("rollout/acceptance_position_1", "acceptance at position 1"),
    )
    for index, (key, label) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), index + 1)
        for run, history in histories.items():
            steps = [e["step"] for e in history if key in e]
            axis.plot(steps, [e[key] for e in history if key in e], label=run, linewidth=1)
        axis.set_xlabel("GRPO step")
        axis.set_ylabel(label)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    histories = {run: train(args, run) for run in args.runs}
    # Runs measured by an earlier invocation (with their own heads and settings) stay in the results.
    results = read_json(args.output, {"runs": {}})
    for run, stored in results["runs"].items():
        if run not in histories:
            histories[run] = stored["steps"]
    print(
        "| run | reward start -> end | entropy start -> end | acceptance pos. 1 start -> end | slope [95% interval] | "
        "end vs first-half fit |"
    )
    print("|---|---|---|---|---|---|")
    for run in [run for run in RUNS if run in histories]:
        history = histories[run]
        if run in args.runs:
            settings = {**vars(args), "mtp_head": run_config(args, run).mtp_head}
            results["runs"][run] = {"settings": settings, "summary": summarise(args, run, history), "steps": history}
        summary = results["runs"][run]["summary"]
        summary["by_entropy"] = by_entropy(history)
        low, high = summary["slope_interval_95"] or (float("nan"), float("nan"))
        print(
            f"| {run} | {summary['reward_start']:.3f} -> {summary['reward_end']:.3f} | "
            f"{summary['entropy_start']:.2f} -> {summary['entropy_end']:.2f} | "
            f"{summary['acceptance_position_1_start']:.3f} -> {summary['acceptance_position_1_end']:.3f} | "
            f"{summary['fit']['slope']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{summary['acceptance_position_1_end_minus_first_half_fit']:+.3f} |"
        )
    print(
        "\n| run | "
        + " | ".join(
            f"entropy {low:g}-{low + ENTROPY_BIN:g}: pos. 1 / drafts per cycle (steps)" for low in ENTROPY_TABLE
        )
        + " |"
    )
    print("|---|" + "---|" * len(ENTROPY_TABLE))
    for run, stored in results["runs"].items():
        cells = {b["entropy_low"]: b for b in stored["summary"]["by_entropy"]}
        row = [
            f"{c['acceptance_position_1']:.3f} / {c['accepted_drafts_per_cycle']:.2f} ({c['steps']})"
            if (c := cells.get(low))
            else "-"
            for low in ENTROPY_TABLE
        ]
        print(f"| {run} | " + " | ".join(row) + " |")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    plot({run: histories[run] for run in RUNS if run in histories}, os.path.splitext(args.output)[0] + ".png")


if __name__ == "__main__":
    main()
