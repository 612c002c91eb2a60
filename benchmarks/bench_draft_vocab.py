"""The shipped SmolLM2 head restricted to a reduced draft vocabulary: covered mass, held-out acceptance, draft cost.

The draft vocabulary D is chosen by token frequency from the policy's own samples (T = 1) on half of the task's
distinct prompts (basic_arithmetic, 2 one-digit terms; see smollm2_task.py) and evaluated on prompts of the
other half. (The shipped head itself was trained on prompts of the whole task, so its acceptance here is not
held-out for the head, only for D.)
A restricted head keeps the shipped head's weights and drafts with the policy's lm_head rows of D only, so q is the
shipped head's distribution renormalised over D: the table shows what the subset alone costs in acceptance, with no
retraining. The draft step is timed against a 1-token decode step in the same run.

    .venv/bin/python benchmarks/bench_draft_vocab.py   # about 15 minutes on 2 CPU cores
"""

import argparse
import json
import os

import torch
from smollm2_task import draft_vocab_from_samples, policy_samples, task_prompt_split

from bebop_trl.embedded import load_smollm2, load_smollm2_head
from bebop_trl.modeling import draft_vocab_mass
from bebop_trl.rollout.measure import measure_acceptance, measure_step_costs, relative_step_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--train-prompts", type=int, default=96, help="Prompts whose samples choose D.")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="Timing rounds of the step costs.")
    parser.add_argument("--output", default="benchmarks/results/draft_vocab.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy)
    vocab_size = policy.config.vocab_size
    train, held_out = task_prompt_split(tokenizer)
    train, held_out = train[: args.train_prompts], held_out[: args.eval_prompts]
    train_samples = policy_samples(policy, tokenizer, train, seed=0)
    eval_samples = policy_samples(policy, tokenizer, held_out, seed=1)

    measure = dict(num_speculative_tokens=3, max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=8, seed=0)
    heads = {"full (49152)": head}
    masses = {"full (49152)": 1.0}
    for size in args.sizes:
        draft_vocab = draft_vocab_from_samples(tokenizer, vocab_size, train_samples, size)
        heads[f"{size}"] = head.with_draft_vocab(draft_vocab)
        masses[f"{size}"] = draft_vocab_mass(draft_vocab, vocab_size, sequences=eval_samples)
    rows = {}
    for name, candidate in heads.items():
        costs = relative_step_costs(
            measure_step_costs(
                policy, candidate, held_out[:1], pad_token_id=tokenizer.pad_token_id, num_speculative_tokens=3,
                temperature=1.0, repeats=args.repeats,
            )
        )  # fmt: skip
        rows[name] = {
            "held_out_mass": masses[name],
            "draft_cost_in_decode_steps": costs["draft"],
            "verify_cost_in_decode_steps": costs["verify"],
        }
        for mode in ("probabilistic", "greedy"):
            summary = measure_acceptance(policy, tokenizer, candidate, held_out, draft_sampling=mode, **measure)
            rows[name][mode] = summary["acceptance_per_position"]
        print(name, rows[name], flush=True)

    print(
        "| draft vocabulary | held-out target mass covered | draft step / decode step | acceptance per position, probabilistic | greedy |"
    )
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        prob = " / ".join(f"{a:.3f}" for a in row["probabilistic"])
        greedy = " / ".join(f"{a:.3f}" for a in row["greedy"])
        print(f"| {name} | {row['held_out_mass']:.3f} | {row['draft_cost_in_decode_steps']:.3f} | {prob} | {greedy} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {
                "command": "python benchmarks/bench_draft_vocab.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "sizes"),
                "sizes": args.sizes,
                "train_prompts": len(train),
                "held_out_prompts": len(held_out),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
