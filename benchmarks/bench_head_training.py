"""Head training throughput on SmolLM2: running the policy every step against reading a self-distilled corpus.

One optimizer step of the head (e2e_tv, 3 unrolled steps, batch `--batch-size`) per configuration, in turn over
`--repeats` rounds after a warm-up round (so that load on a shared machine hits them alike):

- hidden states: `policy` runs the policy for every batch (training from token ids); `corpus` reads them with the
  batch (bf16, as a corpus stores them);
- head: drafting from the full vocabulary, or from a 1024-token draft vocabulary (`--draft-vocab-size`);
- policy normaliser: `per slot` sweeps the policy's whole vocabulary for every (draft step, position) slot inside
  the loss, as the first version did; `per position` computes it once per position and gathers it per slot (what
  `MTPTrainingModule` does); `stored` reads it with the batch, as a corpus built with `log_normalizer=True` stores
  it (draft-vocabulary head and corpus only: elsewhere it saves nothing).

Each configuration runs on a batch as random sampling draws it; the first version's setting and the new one also
run on a batch as length-grouped sampling (`train_sampling_strategy="group_by_length"`, what
`train_smollm2_head.py` uses) draws it, with less padding. Throughput counts real tokens. The first row (random
batch, policy, full vocabulary, per slot) is head training as the first version ran it.

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
from bebop_trl.modeling.teacher_forcing import final_hidden_states, unroll_teacher_forced
from bebop_trl.ops import mtp_loss
from bebop_trl.ops.chunked import policy_log_normalizer
from bebop_trl.speculative.step_costs import interleaved_medians
from bebop_trl.trainers.mtp_trainer import MTPTrainingModule


# The first version's training (the baseline) and the new ones.
FIRST = ("policy", "full vocabulary", "per slot")
LAST = ("corpus", "D=1024", "per position")
STORED = ("corpus", "D=1024", "stored")


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
    prompts = train[: 16 * args.batch_size]
    sequences = [p + c for p, c in zip(prompts, policy_samples(policy, tokenizer, prompts), strict=True)]
    # A batch as random sampling draws it, and one as length-grouped sampling does (`train_sampling_strategy=
    # "group_by_length"`): rows of about the median length, so that little of the batch is padding.
    by_length = sorted(sequences, key=len)
    middle = len(by_length) // 2 - args.batch_size // 2
    batches = {"random": sequences[: args.batch_size], "grouped": by_length[middle : middle + args.batch_size]}
    config = MTPConfig("unused", loss_type="e2e_tv", num_mtp_steps=3, report_to="none")
    heads = {"full vocabulary": MTPHead.from_model(policy).float()}
    if args.draft_vocab_size:
        heads[f"D={args.draft_vocab_size}"] = heads["full vocabulary"].with_draft_vocab(
            torch.arange(args.draft_vocab_size)  # which tokens does not change the cost
        )

    steps, real_tokens = {}, {}
    for batching, batch in batches.items():
        input_ids, attention_mask = padded(batch, tokenizer.pad_token_id)
        real_tokens[batching] = int(attention_mask.sum())
        with torch.no_grad():
            stored = final_hidden_states(policy, input_ids, attention_mask).to(torch.bfloat16)
            stored_normaliser = policy_log_normalizer(stored, policy.lm_head.weight)
        for name, head in heads.items():
            module = MTPTrainingModule(policy, head, config).train()
            optimizer = torch.optim.AdamW(head.parameters(), lr=1e-5)

            def per_position(hidden, module=module, input_ids=input_ids, attention_mask=attention_mask):
                return module(input_ids, attention_mask, hidden_states=hidden).loss

            def per_slot(hidden, head=head, input_ids=input_ids, attention_mask=attention_mask):
                if hidden is None:
                    with torch.no_grad():
                        hidden = final_hidden_states(policy, input_ids, attention_mask)
                slots = unroll_teacher_forced(head, input_ids, hidden.float(), attention_mask, 3)
                return mtp_loss(
                    slots.draft_hidden, slots.target_hidden, head.lm_head_weight, loss_type="e2e_tv",
                    mask=slots.mask, draft_lm_head_weight=head.draft_lm_head_weight, draft_vocab=head.draft_vocab,
                ).loss  # fmt: skip

            def read(hidden, module=module, input_ids=input_ids, attention_mask=attention_mask, lse=stored_normaliser):
                return module(input_ids, attention_mask, hidden_states=hidden, policy_log_normalizer=lse).loss

            for normaliser, loss_of in (("per slot", per_slot), ("per position", per_position), ("stored", read)):
                for source, hidden in (("policy", None), ("corpus", stored)):
                    key = (batching, source, name, normaliser)
                    if normaliser == "stored" and (source, name) != ("corpus", f"D={args.draft_vocab_size}"):
                        continue  # only a draft-vocabulary head reading a corpus uses it
                    if batching == "grouped" and key[1:] not in (FIRST, LAST, STORED):
                        continue  # only the first version's setting and the new ones

                    def step(loss_of=loss_of, hidden=hidden, optimizer=optimizer):
                        optimizer.zero_grad()
                        loss_of(hidden).backward()
                        optimizer.step()

                    steps[", ".join(key)] = step
    medians = interleaved_medians(steps, torch.device("cpu"), args.repeats)
    rows = {}
    for name, seconds in medians.items():
        batching = name.split(", ")[0]
        rows[name] = {"seconds_per_step": seconds, "tokens_per_second": real_tokens[batching] / seconds}
    baseline = rows[", ".join(("random", *FIRST))]["tokens_per_second"]
    print(
        f"batches of {args.batch_size}: random {real_tokens['random']} real tokens, grouped {real_tokens['grouped']};"
        f" e2e_tv, 3 unrolled steps, {args.threads} threads"
    )
    print("| batch | hidden states | head | policy normaliser | s / step | real tokens / s | vs first row |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        row["speedup"] = row["tokens_per_second"] / baseline
        cells = " | ".join(name.split(", "))
        print(f"| {cells} | {row['seconds_per_step']:.2f} | {row['tokens_per_second']:.0f} | {row['speedup']:.2f}x |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "real_tokens_per_batch": real_tokens, "rows": rows}, f, indent=2)


def padded(batch: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = torch.tensor(ids), 1
    return input_ids, attention_mask


if __name__ == "__main__":
    main()
