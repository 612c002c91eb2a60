"""Offline RL tasks with verifiable rewards, from the `reasoning-gym` package."""

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def reasoning_gym_split(
    task: str = "basic_arithmetic",
    num_train: int = 256,
    num_eval: int = 32,
    seed: int = 0,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    **task_config: Any,
) -> tuple[Dataset, Dataset]:
    """Training and evaluation sets of a reasoning-gym task that share no question.

    reasoning-gym draws item i of a dataset with seed `seed + i`, so datasets drawn with seeds s and s + 1 share all
    their items but one: a second seed does not hold anything out. This draws one pool, keeps its first `num_train`
    items for training, and takes as evaluation items the following ones whose question no training item asks (each
    question once).

    Args:
        task: A reasoning-gym dataset name.
        num_train: Training questions.
        num_eval: Evaluation questions.
        seed: Seed of the pool.
        system_prompt: A system turn put before each question (None: none).
        **task_config: Settings of the task's generator.

    Returns:
        `(train, eval)` datasets in the format of [`reasoning_gym_dataset`][bebop_trl.tasks.reasoning_gym_dataset].

    Raises:
        ValueError: If the task has too few distinct questions for `num_eval` held-out ones.
    """
    pool = reasoning_gym_dataset(task, num_train + 8 * num_eval, seed, system_prompt, **task_config)
    questions = [prompt[-1]["content"] for prompt in pool["prompt"]]
    seen = set(questions[:num_train])
    held_out: list[int] = []
    for index in range(num_train, len(pool)):
        if len(held_out) == num_eval:
            break
        if questions[index] not in seen:
            seen.add(questions[index])
            held_out.append(index)
    if len(held_out) == num_eval:
        return pool.select(range(num_train)), pool.select(held_out)
    raise ValueError(
        f"{task} gave only {len(held_out)} questions outside the {num_train} training ones in a pool of {len(pool)}: "
        "lower num_eval or num_train, or widen the task's settings."
    )


ANSWER_SOURCES = ("completion", "last_number")
"""What [`reasoning_gym_reward`][bebop_trl.tasks.reasoning_gym_reward] hands the verifier as the answer."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reasoning_gym_reward(task: str = "basic_arithmetic", answer_from: str = "completion") -> "ReasoningGymReward":
    """A GRPO reward function that scores completions with the task's own verifier.

    Args:
        task: The reasoning-gym dataset name the prompts came from.
        answer_from: What the verifier scores: `"completion"`, the whole completion (stripped), as reasoning-gym
            intends; or `"last_number"`, the last number the completion writes (none: reward 0), for numeric tasks
            and small policies that explain before they answer (`benchmarks/reward_signal.py` measures how much
            GRPO signal each gives on the policy's own samples).

    Returns:
        A reward function `(completions, entry, **kwargs) -> list[float]` for `trl.GRPOTrainer`: `entry` is the
        column of [`reasoning_gym_dataset`][bebop_trl.tasks.reasoning_gym_dataset]; conversational completions are
        scored on their text. It pickles, as TRL's async rollout worker needs.

    Raises:
        ValueError: If `answer_from` is not one of `ANSWER_SOURCES`.
    """
    return ReasoningGymReward(task, answer_from)


class ReasoningGymReward:
    """The reward function of [`reasoning_gym_reward`][bebop_trl.tasks.reasoning_gym_reward]."""

    def __init__(self, task: str, answer_from: str):
        if answer_from not in ANSWER_SOURCES:
            raise ValueError(f"answer_from must be one of {ANSWER_SOURCES}, got {answer_from!r}.")
        import reasoning_gym

        self.task, self.answer_from = task, answer_from
        self._score_answer = reasoning_gym.get_score_answer_fn(task)
        # TRL logs each reward under its function's name.
        self.__name__ = f"{task}_reward" if answer_from == "completion" else f"{task}_{answer_from}_reward"

    def __reduce__(self):
        return ReasoningGymReward, (self.task, self.answer_from)

    def answer(self, text: str) -> str:
        if self.answer_from == "completion":
            return text.strip()
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else ""

    def __call__(self, completions: list[Any], entry: list[str], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            float(self._score_answer(self.answer(text), json.loads(e))) for text, e in zip(texts, entry, strict=True)
        ]


def distinct_prompt_split(
    tokenizer: "PreTrainedTokenizerBase",
    task: str = "basic_arithmetic",
    pool_size: int = 1024,
    seed: int = 0,
    held_out: int | float = 0.5,
    **task_config: Any,
) -> tuple[list[list[int]], list[list[int]]]:
    """`(train, held_out)`: the chat-templated prompt ids of a task's pool of `pool_size` questions, split by
    [`split_distinct_prompts`][bebop_trl.tasks.split_distinct_prompts] into two sets that share no prompt.

    The shipped SmolLM2 head was trained on the policy's samples of the training half of the quickstart task's split
    (`pool_size=1024`, `seed=0`): its held-out half is held out from that head.
    """
    from .trainers.mtp_data import prompt_ids_of

    pool = prompt_ids_of(reasoning_gym_dataset(task, pool_size, seed=seed, **task_config), tokenizer)
    return split_distinct_prompts(pool, held_out=held_out, seed=seed)


def split_distinct_prompts(
    prompts: Sequence[Sequence[int]], held_out: int | float = 0.5, seed: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    """Splits the distinct prompts of a pool into a training set and a held-out set that share none.

    Another seed is not another set of prompts: reasoning-gym draws item i of a dataset with seed `seed + i`, so the
    items of seed 7 are items 7, 8, ... of seed 0, and small task spaces also repeat prompts within a pool. The
    split is over the deduplicated prompts, in a seeded random order.

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
