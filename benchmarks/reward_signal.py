"""How much GRPO signal each reward gives on the quickstart task: scored on the policy's own samples, no generation.

The self-distilled corpus of `build_smollm2_corpus.py` holds `samples_per_prompt` completions per training prompt,
sampled from SmolLM2-135M-Instruct at T = 1. Each is scored with `reasoning_gym_reward` in both answer modes: the
task's verifier on the whole completion, and on its last number. Reported per mode: the mean reward, the share of
prompts with any reward, and the share of GRPO groups (consecutive samples of one prompt, `--group-size` each) whose
rewards differ, which are the only groups that give GRPO an advantage to learn from.

    .venv/bin/python benchmarks/reward_signal.py   # a minute: decoding and scoring only
"""

import argparse
import json
import os

import numpy as np
from transformers import AutoTokenizer

from bebop_trl.embedded import smollm2_path
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.tasks import ANSWER_SOURCES, reasoning_gym_dataset, reasoning_gym_reward
from bebop_trl.trainers.distill_corpus import load_distill_corpus
from bebop_trl.trainers.mtp_data import prompt_ids_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", default="outputs/corpora/smollm2-basic-arithmetic-t1")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/reward_signal.json")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    # The corpus's prompts are questions of this pool (see smollm2_task.py): their entries carry the answers.
    pool = reasoning_gym_dataset("basic_arithmetic", 1024, seed=0, **DEFAULT_TASK_CONFIG)
    entry_of = {tuple(ids): entry for ids, entry in zip(prompt_ids_of(pool, tokenizer), pool["entry"], strict=True)}
    corpus = load_distill_corpus(args.corpus_dir).select_columns(["input_ids", "prompt_length"])
    by_prompt: dict[tuple, list[int]] = {}
    texts, entries = [], []
    for index, (ids, length) in enumerate(zip(corpus["input_ids"], corpus["prompt_length"], strict=True)):
        prompt = tuple(ids[:length])
        by_prompt.setdefault(prompt, []).append(index)
        texts.append(tokenizer.decode(ids[length:], skip_special_tokens=True))
        entries.append(entry_of[prompt])

    results = {"corpus": args.corpus_dir, "completions": len(texts), "prompts": len(by_prompt), "modes": {}}
    print("| answer from | mean reward | prompts with any reward | groups with reward spread |")
    print("|---|---|---|---|")
    for mode in ANSWER_SOURCES:
        rewards = np.array(reasoning_gym_reward("basic_arithmetic", answer_from=mode)(texts, entry=entries))
        groups = [
            rewards[indices[start : start + args.group_size]]
            for indices in by_prompt.values()
            for start in range(0, len(indices) - args.group_size + 1, args.group_size)
        ]
        figures = {
            "mean_reward": float(rewards.mean()),
            "prompts_with_reward": float(np.mean([rewards[i].max() > 0 for i in by_prompt.values()])),
            "groups_with_spread": float(np.mean([group.std() > 0 for group in groups])),
            "groups": len(groups),
        }
        results["modes"][mode] = figures
        print(
            f"| {mode} | {figures['mean_reward']:.4f} | {figures['prompts_with_reward']:.2f} | "
            f"{figures['groups_with_spread']:.2f} |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
