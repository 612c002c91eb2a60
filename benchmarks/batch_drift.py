"""What a static batch does with speculation: forward passes, tokens per pass, active rows and cache width.

The engine keeps a batch until its slowest row ends. With speculation rows accept different numbers of drafts and
drift apart, so a batch's tokens per forward pass fall below what one row gets, and the slots a row rejected stay
(masked) in the caches while another row kept them. This counts both on a batch of held-out prompts of the
quickstart task (`smollm2_task.py`), plain sampling against the shipped head restricted to a 1024-token draft
vocabulary with k = 1 and 2. The counts do not depend on the machine's load.

    .venv/bin/python benchmarks/batch_drift.py
"""

import argparse
import json
import os

import torch
from smollm2_task import draft_vocab_from_samples, policy_samples, task_prompt_split

from bebop_trl import SpeculativeGenerator
from bebop_trl.embedded import load_smollm2, load_smollm2_head
from bebop_trl.rollout.torch_engine import padded_prompts
from bebop_trl.speculative import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-vocab-size", type=int, default=1024)
    parser.add_argument("--train-prompts", type=int, default=96, help="Prompts whose samples choose the subset.")
    parser.add_argument("--output", default="benchmarks/results/batch_drift.json")
    args = parser.parse_args()

    policy, tokenizer = load_smollm2()
    train, held_out = task_prompt_split(tokenizer)
    samples = policy_samples(policy, tokenizer, train[: args.train_prompts])
    head = load_smollm2_head(policy).with_draft_vocab(
        draft_vocab_from_samples(tokenizer, policy.config.vocab_size, samples, args.draft_vocab_size)
    )
    input_ids, attention_mask = padded_prompts(policy, tokenizer, held_out[: args.batch_size])

    # Every cycle's end state: cache width, mean valid slots per row, rows still generating.
    cycles: list[tuple[int, float, int]] = []
    advance = engine._DecodeState.advance

    def counted_advance(state, tokens, num_accepted, hidden_states):
        advance(state, tokens, num_accepted, hidden_states)
        mask = state.attention_mask
        cycles.append((mask.shape[1], mask.sum(-1).float().mean().item(), len(state.rows)))

    engine._DecodeState.advance = counted_advance
    rows = {}
    for name, candidate, k in (("plain", None, 1), ("D k=1", head, 1), ("D k=2", head, 2)):
        cycles.clear()
        out = SpeculativeGenerator(policy, candidate, k).generate(
            input_ids, attention_mask, max_new_tokens=args.max_new_tokens, temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        tokens = int(out.completion_mask.sum())
        rows[name] = {
            "forward_passes": len(cycles),
            "tokens": tokens,
            "tokens_per_pass": tokens / len(cycles),
            "tokens_per_row_pass": 1 + out.stats.accepted_drafts_per_cycle if candidate is not None else 1.0,
            "mean_active_rows": sum(c[2] for c in cycles) / len(cycles),
            "final_cache_width": cycles[-1][0],
            "final_valid_slots_per_row": cycles[-1][1],
        }
    engine._DecodeState.advance = advance

    print(f"batch {args.batch_size}, <= {args.max_new_tokens} tokens, prompts {input_ids.shape[1]} tokens wide")
    print("| engine | passes | tokens | tokens / pass | tokens / row-pass | active rows | cache width (valid) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['forward_passes']} | {r['tokens']} | {r['tokens_per_pass']:.2f} | "
            f"{r['tokens_per_row_pass']:.2f} | {r['mean_active_rows']:.2f} | "
            f"{r['final_cache_width']} ({r['final_valid_slots_per_row']:.1f}) |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
