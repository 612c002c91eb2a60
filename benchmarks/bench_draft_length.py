"""Draft length per cycle against fixed k: tokens per second of the engine with the shipped SmolLM2 head.

Engines with k = 1, 2, 3, 4 drafts per cycle and with `num_speculative_tokens="auto"` (up to 4 drafts, the step
costs calibrated on the first batch, acceptance learnt from the cycles), against plain sampling with the same
engine, at T = 1 with probabilistic drafting, on prompts of the head's task held out from the choice of the draft
vocabulary (see `smollm2_task.py`). A full-vocabulary head also runs restricted to a draft vocabulary
(`--draft-vocab-size`, chosen from the policy's samples on the other half of the prompts) with k = 1, 2, 3 and
"auto"; a head trained on its own draft vocabulary runs only so ("D" rows). All engines run
the same batches in turn (rotating order, same seeds), so the speed-ups are ratios measured side by side. Besides
the measured speed-up, the table gives the accepted tokens per unit cost that the acceptance and the calibrated
step costs imply. Before the timed runs every engine generates `--warmup-prompts` prompts of the training split
untimed, so that "auto" is timed in the steady state of a long run (its acceptance table learnt, its cycles timed).
At batch sizes above 1 each call generates `--queue` prompts, `batch size` rows at a time with continuous batching,
as a GRPO round does (`rollout_max_batch_size`).

    .venv/bin/python benchmarks/bench_draft_length.py          # batch 1 and 8, about 15 minutes on 2 CPU cores
"""

import argparse
import json
import os

import torch
from smollm2_task import draft_vocab_from_samples, policy_samples, task_prompt_split

from bebop_trl import SpeculativeGenerator
from bebop_trl.embedded import load_smollm2, load_smollm2_head
from bebop_trl.modeling import MTPHead
from bebop_trl.rollout.measure import compare_engine_speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[16, 32], help="Held-out prompts, one count per batch size."
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--head", default=None, help="Head folder (default: the shipped head).")
    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        default=1024,
        help="Also run a full-vocabulary head restricted to this many tokens (0: not).",
    )
    parser.add_argument("--train-prompts", type=int, default=96, help="Prompts whose samples choose the subset.")
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=32,
        help="Training-split prompts every engine generates untimed first, per batch size: the steady state of a "
        "long run, where the 'auto' policy has learnt acceptance and timed its cycles (0: from a cold start).",
    )
    parser.add_argument("--max-k", type=int, default=4, help="Longest fixed draft length run.")
    parser.add_argument(
        "--queue",
        type=int,
        default=32,
        help="At batch sizes above 1, prompts per generate call, decoded `batch size` rows at a time with continuous "
        "batching (a finished row takes the next prompt), as GRPO rounds run; 0: static batches of `batch size`.",
    )
    parser.add_argument("--output", default="benchmarks/results/draft_length.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy) if args.head is None else MTPHead.from_pretrained(args.head, policy=policy)
    train, held_out = task_prompt_split(tokenizer)
    if len(args.prompts) != len(args.batch_sizes):
        parser.error("--prompts needs one count per batch size.")
    # Engines named "D ..." draft from a draft vocabulary: the head's own, or the full head restricted to one.
    heads = {"": head}
    if head.draft_vocab is not None:
        heads = {"D ": head}
    elif args.draft_vocab_size:
        samples = policy_samples(policy, tokenizer, train[: args.train_prompts])
        heads["D "] = head.with_draft_vocab(
            draft_vocab_from_samples(tokenizer, policy.config.vocab_size, samples, args.draft_vocab_size)
        )
    results = {"threads": torch.get_num_threads(), "args": vars(args), "batch_sizes": {}}
    for batch_size, num_prompts in zip(args.batch_sizes, args.prompts, strict=True):
        prompts = held_out[:num_prompts]
        per_call = args.queue if batch_size > 1 and args.queue else batch_size
        batches = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
        engines = {"plain": SpeculativeGenerator(policy, None)}
        for prefix, drafter in heads.items():
            for k in range(1, args.max_k + 1) if drafter.draft_vocab is None else (1, 2, 3):
                engines[f"{prefix}k={k}"] = SpeculativeGenerator(policy, drafter, k)
            engines[f"{prefix}auto"] = SpeculativeGenerator(policy, drafter, "auto")
        warmup = train[len(train) - args.warmup_prompts :] if args.warmup_prompts else []
        measured = compare_engine_speeds(
            engines,
            tokenizer,
            batches,
            warmup_batches=[warmup[i : i + per_call] for i in range(0, len(warmup), per_call)],
            max_batch_size=batch_size,
            repeats=args.repeats,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            seed=0,
        )
        rows = {}
        for name in engines:
            if name == "plain":
                continue
            # Each head's own calibrated costs (a restricted head drafts for less).
            costs = engines["D auto" if name.startswith("D ") else "auto"].draft_length.costs
            summary = measured[name]
            drafted = summary["num_draft_tokens"] / summary["num_drafts"]
            tokens_per_cycle = 1.0 + summary["accepted_drafts_per_cycle"]
            # drafted_per_position[j - 1] counts the cycles that drafted at least j tokens.
            at_least = [*summary["drafted_per_position"], 0]
            cycles_of_length = {j: at_least[j - 1] - at_least[j] for j in range(1, len(at_least))}
            cycle_cost = sum(n * costs.cycle(j) for j, n in cycles_of_length.items()) / summary["num_drafts"]
            rows[name] = {
                "speedup": measured["speedup"][name],
                "mean_draft_length": drafted,
                "acceptance_per_position": summary["acceptance_per_position"],
                "tokens_per_cycle": tokens_per_cycle,
                "tokens_per_unit_cost": tokens_per_cycle / cycle_cost,
            }
        calibrated = {
            name: {"draft": engine.draft_length.costs.draft, "verify": list(engine.draft_length.costs.verify)}
            for name, engine in engines.items()
            if name.endswith("auto")
        }
        results["batch_sizes"][batch_size] = {
            "calibrated_costs": calibrated,
            "prompts_per_call": per_call,
            "rows": rows,
        }
        print(f"\nBatch {batch_size} ({per_call} prompts per call): calibrated costs in decode steps {calibrated}")
        print("| engine | mean draft length | tokens per cycle | tokens per unit cost (implied) | measured speed-up |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            print(
                f"| {name} | {row['mean_draft_length']:.2f} | {row['tokens_per_cycle']:.2f} | "
                f"{row['tokens_per_unit_cost']:.2f} | {row['speedup']:.2f}x |"
            )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
