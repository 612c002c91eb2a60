"""GRPO groups drafting from their own rollouts: tokens per second of the engine on the quickstart task.

GRPO samples `--group-size` completions of every prompt and the prompts come back every epoch, so a completion
can draft from the other completions of its prompt. Each of `--prompts` held-out prompts is sampled
`--group-size` times per epoch, for `--epochs` epochs, by: plain sampling; the shipped head (k drafts per cycle);
rollout drafts alone (`RolloutDrafter`, no head); and the head with rollout drafts (per row and cycle, the source
predicted to have more drafts accepted drafts). At batch 1 a group's completions are generated one after another,
each drafting from the earlier ones and from earlier epochs; at batch `--group-size` a group is one batch, whose
rows draft from each other as they grow and from earlier epochs. Every engine with rollout drafts has a drafter of
its own, which remembers only what that engine generated. Runs are interleaved with the same seeds (a new seed per
epoch), so the speed-ups are ratios measured side by side; the table also gives the share of the draft cycles
drafted from rollouts, their acceptance, and the policy's mean entropy, which bounds what any drafter can guess.

    .venv/bin/python benchmarks/bench_rollout_drafts.py        # T = 1 and 0.6, batch 1 and 8: about 40 minutes
"""

import argparse
import json
import os

import torch
from smollm2_task import task_prompt_split

from bebop_trl import SpeculativeGenerator
from bebop_trl.embedded import load_smollm2, load_smollm2_head
from bebop_trl.rollout.measure import compare_engine_speeds
from bebop_trl.speculative.rollout_drafts import RolloutDrafter


def engines_for(policy, head, k: int) -> dict[str, SpeculativeGenerator]:
    """The four engines, each drafter fresh (no history)."""
    return {
        "plain": SpeculativeGenerator(policy, None),
        f"head k={k}": SpeculativeGenerator(policy, head, k),
        f"rollouts k={k}": SpeculativeGenerator(policy, None, k, rollout_drafter=RolloutDrafter()),
        f"head + rollouts k={k}": SpeculativeGenerator(policy, head, k, rollout_drafter=RolloutDrafter()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="1 and/or the group size.")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.6])
    parser.add_argument("--prompts", type=int, default=4, help="Held-out prompts (GRPO groups per epoch).")
    parser.add_argument("--group-size", type=int, default=8, help="Completions per prompt per epoch.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=3, help="Most drafts per cycle.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="benchmarks/results/rollout_drafts.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(b not in (1, args.group_size) for b in args.batch_sizes):
        parser.error(f"--batch-sizes takes 1 and/or the group size ({args.group_size}).")

    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy)
    _, held_out = task_prompt_split(tokenizer)
    prompts = held_out[: args.prompts]
    results = {"threads": torch.get_num_threads(), "args": vars(args), "runs": []}
    for temperature in args.temperatures:
        for batch_size in args.batch_sizes:
            group = [[p] * args.group_size for p in prompts]
            # Batch 1: the group's completions one after another; batch G: the group at once.
            batches = [[p] for g in group for p in g] if batch_size == 1 else group
            engines = engines_for(policy, head, args.k)
            for epoch in range(args.epochs):
                measured = compare_engine_speeds(
                    engines,
                    tokenizer,
                    batches,
                    repeats=1,
                    max_new_tokens=args.max_new_tokens,
                    temperature=temperature,
                    seed=10_000 * (epoch + 1),
                )
                rows = {name: {"speedup": measured["speedup"].get(name, 1.0), **measured[name]} for name in engines}
                results["runs"].append(
                    {"temperature": temperature, "batch_size": batch_size, "epoch": epoch + 1, "rows": rows}
                )
                print_table(temperature, batch_size, epoch + 1, rows)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


def print_table(temperature: float, batch_size: int, epoch: int, rows: dict) -> None:
    print(f"\nT = {temperature}, batch {batch_size}, epoch {epoch}")
    print("| engine | speed-up | accepted per cycle | rollout share of cycles | rollout acceptance | entropy |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [
            f"{row['speedup']:.2f}x",
            f"{row.get('accepted_drafts_per_cycle', 0.0):.2f}",
            f"{row.get('rollout_draft_share', 0.0):.2f}",
            f"{row.get('rollout_acceptance_rate', 0.0):.2f}",
            f"{row['mean_entropy']:.2f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
