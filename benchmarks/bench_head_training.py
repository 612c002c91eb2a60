"""Head training throughput on SmolLM2: running the policy every step against reading a self-distilled corpus.

One optimizer step of `MTPTrainingModule` (e2e_tv, 3 unrolled steps, batch `--batch-size`) per configuration, in
turn over `--repeats` rounds after a warm-up round (so that load on a shared machine hits them alike):

- `policy`: the policy runs for the hidden states of every batch (training from token ids);
- `corpus`: the hidden states come with the batch (bf16, as a corpus stores them);
- the same two with a 1024-token draft vocabulary (`--draft-vocab-size`).

Throughput is the batch's tokens over the median step time.

    .venv/bin/python benchmarks/bench_head_training.py     # a few minutes on 2 CPU cores
"""

import argparse
import json
import os

import torch
from smollm2_task import policy_samples, task_prompt_split

from bebop_trl import MTPConfig, MTPHead
from bebop_trl.embedded import load_smollm2
from bebop_trl.modeling.teacher_forcing import final_hidden_states
from bebop_trl.speculative.step_costs import interleaved_medians
from bebop_trl.trainers.mtp_trainer import MTPTrainingModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-vocab-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/head_training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy, tokenizer = load_smollm2()
    train, _ = task_prompt_split(tokenizer)
    prompts = train[: args.batch_size]
    sequences = [p + c for p, c in zip(prompts, policy_samples(policy, tokenizer, prompts), strict=True)]
    batch = sequences[: args.batch_size]
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = torch.tensor(ids), 1
    with torch.no_grad():
        stored = final_hidden_states(policy, input_ids, attention_mask).to(torch.bfloat16)
    config = MTPConfig("unused", loss_type="e2e_tv", num_mtp_steps=3, report_to="none")

    heads = {"full vocabulary": MTPHead.from_model(policy).float()}
    if args.draft_vocab_size:
        heads[f"D={args.draft_vocab_size}"] = heads["full vocabulary"].with_draft_vocab(
            torch.arange(args.draft_vocab_size)  # which tokens does not change the cost
        )
    steps = {}
    for name, head in heads.items():
        module = MTPTrainingModule(policy, head, config).train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-5)

        def step(module=module, optimizer=optimizer, hidden=None):
            optimizer.zero_grad()
            module(input_ids, attention_mask, hidden_states=hidden).loss.backward()
            optimizer.step()

        steps[f"policy, {name}"] = step
        steps[f"corpus, {name}"] = lambda step=step: step(hidden=stored)
    medians = interleaved_medians(steps, torch.device("cpu"), args.repeats)
    tokens = int(attention_mask.sum())
    rows = {name: {"seconds_per_step": s, "tokens_per_second": tokens / s} for name, s in medians.items()}
    baseline = rows["policy, full vocabulary"]["tokens_per_second"]
    print(f"batch {len(batch)} x {width} tokens ({tokens} real), e2e_tv, 3 unrolled steps, {args.threads} threads")
    print("| hidden states | head | s / step | tokens / s | vs policy, full vocabulary |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        source, head = name.split(", ")
        row["speedup"] = row["tokens_per_second"] / baseline
        print(
            f"| {source} | {head} | {row['seconds_per_step']:.2f} | {row['tokens_per_second']:.0f} | {row['speedup']:.2f}x |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "tokens_per_batch": tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
