"""Offline RL tasks with verifiable rewards, from the `reasoning-gym` package."""

import json

from datasets import Dataset


DEFAULT_SYSTEM_PROMPT = "Answer with the final result only."


def reasoning_gym_dataset(
    task: str = "basic_arithmetic", size: int = 256, seed: int = 0, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> Dataset:
    """A conversational prompt dataset of a reasoning-gym task.

    Args:
        task: A reasoning-gym dataset name (e.g. `"basic_arithmetic"`, `"chain_sum"`, `"countdown"`).
        size: Number of questions.
        seed: Seed of the task's generator.
        system_prompt: A system turn put before each question (None: none).

    Returns:
        Columns `prompt` (a list of chat messages ending in the user's question), `answer` and `entry` (the
        task's JSON-encoded record, which the task's scorer reads).
    """
    import reasoning_gym

    records = list(reasoning_gym.create_dataset(task, size=size, seed=seed))
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return Dataset.from_dict(
        {
            "prompt": [[*system, {"role": "user", "content": r["question"]}] for r in records],
            "answer": [str(r["answer"]) for r in records],
            "entry": [json.dumps(r, default=str) for r in records],
        }
    )
