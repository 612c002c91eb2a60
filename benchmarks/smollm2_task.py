"""The held-out setting shared by the SmolLM2 benchmarks: the quickstart task's distinct prompts split in two.

Prompts drawn with another seed are not held out: reasoning-gym draws item i with seed `seed + i`, so seed 7's
items are items 7, 8, ... of seed 0. The benchmarks split the distinct prompts of a 1024-question pool of the
quickstart task (basic_arithmetic, 2 one-digit terms: 791 distinct prompts) in two: draft
vocabularies are chosen from the policy's samples on the first half, and speeds and acceptance are measured on the
second. The shipped head was trained on the corpus of `build_smollm2_corpus.py`, which holds the policy's samples of
the first half only, so the second half is held out from it too (and so is the quickstart's held-out set, which it
takes from that half when it runs the shipped head).
"""

import hashlib
import json
import os

import torch

from bebop_trl.modeling import select_draft_vocab
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.rollout.torch_engine import sample_completions
from bebop_trl.tasks import distinct_prompt_split


def task_prompt_split(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """`(train, held_out)`: the task's distinct prompts (as token ids), split in two halves that share none."""
    return distinct_prompt_split(tokenizer, "basic_arithmetic", 1024, seed=0, **DEFAULT_TASK_CONFIG)


SAMPLES_CACHE = "outputs/benchmarks/policy_samples"


def policy_samples(policy, tokenizer, prompts: list[list[int]], seed: int = 0) -> list[list[int]]:
    """The policy's completions of `prompts` at T = 1 (at most 128 tokens), in batches of 32.

    Kept under `outputs/benchmarks/` by prompts and seed, so that the benchmarks that choose a draft vocabulary from
    the same prompts sample them once (deleting the folder only costs the sampling again).
    """
    key = hashlib.sha256(json.dumps([prompts, seed]).encode()).hexdigest()[:16]
    path = os.path.join(SAMPLES_CACHE, f"{key}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    samples = [
        ids
        for start in range(0, len(prompts), 32)
        for ids in sample_completions(
            policy, tokenizer, prompts[start : start + 32], generator=torch.Generator().manual_seed(seed + start),
            max_new_tokens=128, temperature=1.0,
        )
    ]  # fmt: skip
    os.makedirs(SAMPLES_CACHE, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples, f)
    return samples


def draft_vocab_from_samples(tokenizer, vocab_size: int, samples: list[list[int]], size: int) -> torch.LongTensor:
    """The `size` most frequent tokens of `samples`, the tokenizer's special tokens always included."""
    special = [i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None]
    return select_draft_vocab(vocab_size, sequences=samples, size=size, always_include=special)
