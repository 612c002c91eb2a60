"""Offline RL tasks with verifiable rewards, from the `reasoning-gym` package."""

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset


DEFAULT_SYSTEM_PROMPT = "Answer with the final result only."


def reasoning_gym_dataset(
    task: str = "basic_arithmetic",
    size: int = 256,
    seed: int = 0,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    **task_config: Any,
) -> Dataset:
    """A conversational prompt dataset of a reasoning-gym task.

    Args:
        task: A reasoning-gym dataset name (e.g. `"basic_arithmetic"`, `"chain_sum"`, `"countdown"`).
        size: Number of questions.
        seed: Seed of the task's generator.
        system_prompt: A system turn put before each question (None: none).
        **task_config: Settings of the task's generator (e.g. `max_terms=2, max_digits=1` for
            `basic_arithmetic`).

    Returns:
        Columns `prompt` (a list of chat messages ending in the user's question), `answer` and `entry` (the
        task's JSON-encoded record, which the task's scorer reads).
    """
    import reasoning_gym

    records = list(reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config))
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return Dataset.from_dict(
        {
            "prompt": [[*system, {"role": "user", "content": r["question"]}] for r in records],
            "answer": [str(r["answer"]) for r in records],
            "entry": [json.dumps(r, default=str) for r in records],
        }
    )


def reasoning_gym_reward(task: str = "basic_arithmetic") -> Callable[..., list[float]]:
    """A GRPO reward function that scores completions with the task's own verifier.

    Args:
        task: The reasoning-gym dataset name the prompts came from.

    Returns:
        A reward function `(completions, entry, **kwargs) -> list[float]` for `trl.GRPOTrainer`: `entry` is the
        column of [`reasoning_gym_dataset`][bebop_trl.tasks.reasoning_gym_dataset]; conversational completions are
        scored on their text, stripped.
    """
    import reasoning_gym

    score_answer = reasoning_gym.get_score_answer_fn(task)

    def reward(completions: list[Any], entry: list[str], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(score_answer(text.strip(), json.loads(e))) for text, e in zip(texts, entry, strict=True)]

    reward.__name__ = f"{task}_reward"
    return reward


def split_distinct_prompts(
    prompts: Sequence[Sequence[int]], held_out: int | float = 0.5, seed: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    """Splits the distinct prompts of a pool into a training set and a held-out set that share none.

    Generated tasks repeat prompts: the 2-term one-digit sums of the quickstart task have about 250 distinct
    prompts, so pools drawn with different seeds overlap, and held-out seeds are not held-out prompts. The split
    is over the deduplicated prompts, in a seeded random order.

    Args:
        prompts: Prompt token id lists (repeats allowed).
        held_out: Number of distinct prompts held out, or their fraction (a float in (0, 1)).
        seed: Seed of the order.

    Returns:
        `(train, held_out)` lists of distinct prompts.
    """
    distinct = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
    count = round(held_out * len(distinct)) if isinstance(held_out, float) else held_out
    if not 0 < count < len(distinct):
        raise ValueError(
            f"held_out must leave both sets non-empty: {held_out!r} of {len(distinct)} distinct prompts gives {count}."
        )
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    return [distinct[i] for i in order[count:]], [distinct[i] for i in order[:count]]
