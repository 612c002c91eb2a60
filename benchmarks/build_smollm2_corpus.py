"""Self-distils the quickstart task on the embedded SmolLM2 into a corpus for head training (a long, resumable job).

The training half of the task's distinct prompts (see `smollm2_task.py`; the held-out half is excluded, so no
evaluation prompt is ever trained on) is sampled at T = 1 until about `--target-tokens` completion tokens, by plain sampling at a large batch (on 2 cores
it gives about twice the tokens per second of speculative sampling at batch 32: 170 vs 81 with the hidden-state pass
included). Each record keeps the policy's final hidden state at every position and the hidden states entering the
three layers an EAGLE-3 head fuses, so heads of either layout train on the corpus without running the policy again. Rerunning the same
command resumes an interrupted build at its first missing shard; every run appends its wall time to the summary.

    nohup .venv/bin/python benchmarks/build_smollm2_corpus.py > corpus.log 2>&1 &   # about 1M tokens: hours on 2 cores
"""

import argparse
import json
import os
import time

import torch
from smollm2_task import task_prompt_split

from bebop_trl.embedded import load_smollm2
from bebop_trl.modeling import eagle3_aux_layers
from bebop_trl.trainers.distill_corpus import build_distill_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-tokens", type=int, default=1_000_000, help="Completion tokens to sample (about).")
    parser.add_argument(
        "--tokens-per-completion", type=float, default=72.0, help="Expected completion length, to size the job."
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument(
        "--log-normalizer",
        action="store_true",
        help="Also store the policy's log-normaliser per position (faster draft-vocabulary training; a new corpus).",
    )
    parser.add_argument("--output-dir", default="outputs/corpora/smollm2-basic-arithmetic-t1")
    parser.add_argument("--summary", default="benchmarks/results/smollm2_corpus.json")
    args = parser.parse_args()

    policy, tokenizer = load_smollm2()
    train, held_out = task_prompt_split(tokenizer)
    samples_per_prompt = max(1, round(args.target_tokens / args.tokens_per_completion / len(train)))
    started = time.perf_counter()
    corpus = build_distill_corpus(
        policy, tokenizer, train, args.output_dir, exclude_prompts=held_out, samples_per_prompt=samples_per_prompt,
        max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.batch_size, shard_size=args.shard_size,
        seed=0, aux_layers=eagle3_aux_layers(policy.config.num_hidden_layers), log_normalizer=args.log_normalizer,
    )  # fmt: skip
    seconds = time.perf_counter() - started

    summary = {}
    if os.path.exists(args.summary):
        with open(args.summary, encoding="utf-8") as f:
            summary = json.load(f)
    ids = corpus.select_columns(["input_ids", "prompt_length"])  # the hidden states are not read
    corpus_prompts = {tuple(row[:n]) for row, n in zip(ids["input_ids"], ids["prompt_length"], strict=True)}
    lengths = {
        "total": [len(row) for row in ids["input_ids"]],
        "completion": [len(row) - n for row, n in zip(ids["input_ids"], ids["prompt_length"], strict=True)],
    }
    runs = [*summary.get("runs", []), {"seconds": seconds, "threads": torch.get_num_threads()}]
    summary = {
        "command": "python benchmarks/build_smollm2_corpus.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v is not False
        ),
        "train_prompts": len(train),
        "held_out_prompts_excluded": len(held_out),
        "distinct_prompts_in_corpus": len(corpus_prompts),
        # Counted on the corpus itself: every evaluation prompt of smollm2_task must be absent from it.
        "held_out_prompts_in_corpus": len(corpus_prompts & {tuple(p) for p in held_out}),
        "samples_per_prompt": samples_per_prompt,
        "records": len(corpus),
        "completion_tokens": int(sum(lengths["completion"])),
        "tokens_with_prompts": int(sum(lengths["total"])),
        "runs": runs,
        "wall_seconds": sum(run["seconds"] for run in runs),
    }
    os.makedirs(os.path.dirname(args.summary), exist_ok=True)
    with open(args.summary, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
