"""Splitting a task's prompts into training and held-out sets."""

import pytest
from datasets import Dataset

from bebop_trl import tasks
from bebop_trl.tasks import split_distinct_prompts


def test_split_is_over_distinct_prompts_disjoint_and_seeded():
    prompts = [[1, 2], [3], [1, 2], [4, 5], [3], [6], [7, 8], [9]]  # 6 distinct
    train, held_out = split_distinct_prompts(prompts, held_out=0.5, seed=0)
    assert len(train) == len(held_out) == 3
    assert not {tuple(p) for p in train} & {tuple(p) for p in held_out}
    assert sorted(map(tuple, train + held_out)) == sorted({tuple(p) for p in prompts})
    assert split_distinct_prompts(prompts, held_out=0.5, seed=0) == (train, held_out)
    assert split_distinct_prompts(prompts, held_out=0.5, seed=1) != (train, held_out)
    assert len(split_distinct_prompts(prompts, held_out=2)[1]) == 2


@pytest.mark.parametrize("held_out", [0, 6, 0.01, 0.99])
def test_a_split_that_empties_a_set_is_refused(held_out):
    with pytest.raises(ValueError, match="must leave both sets non-empty"):
        split_distinct_prompts([[i] for i in range(6)], held_out=held_out)


def test_reasoning_gym_split_holds_out_questions_the_training_set_does_not_ask(monkeypatch):
    pytest.importorskip("reasoning_gym")
    from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_split

    config = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    # The pitfall it avoids: a second seed repeats the first one's items, shifted by one.
    first = reasoning_gym_dataset("basic_arithmetic", 16, seed=0, **config)["prompt"]
    assert reasoning_gym_dataset("basic_arithmetic", 8, seed=1, **config)["prompt"] == first[1:9]

    train, held_out = reasoning_gym_split("basic_arithmetic", 64, 16, seed=0, **config)
    questions = lambda data: [p[-1]["content"] for p in data["prompt"]]  # noqa: E731
    assert len(train) == 64 and len(held_out) == 16
    assert not set(questions(train)) & set(questions(held_out))
    assert len(set(questions(held_out))) == 16
    assert train["prompt"] == reasoning_gym_dataset("basic_arithmetic", 64, seed=0, **config)["prompt"]

    # A task with too few distinct questions: every pool repeats the same three.
    repeated = lambda task, size, seed, system_prompt, **config: Dataset.from_dict(  # noqa: E731
        {"prompt": [[{"role": "user", "content": f"q{i % 3}"}] for i in range(size)]}
    )
    monkeypatch.setattr(tasks, "reasoning_gym_dataset", repeated)
    with pytest.raises(ValueError, match="gave only 1 questions outside the 2 training ones"):
        tasks.reasoning_gym_split("basic_arithmetic", 2, 4)


def test_the_reward_scores_the_whole_completion_or_its_last_number():
    pytest.importorskip("reasoning_gym")
    from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_reward

    dataset = reasoning_gym_dataset(
        "basic_arithmetic", 2, seed=0, min_terms=2, max_terms=2, min_digits=1, max_digits=1
    )
    answers = dataset["answer"]
    assert not any(digit in "".join(answers) for digit in "8")  # so that 88 cannot earn partial credit
    completions = [
        answers[0],  # the answer alone: both score it 1
        f"First 12, then the result is {answers[0]}.",  # explained, answer last
        f"The result is {answers[1]}, not 88.",  # explained, another number last
        "I cannot tell.",  # no number
    ]
    entries = [dataset["entry"][0]] * 2 + [dataset["entry"][1]] * 2
    whole = reasoning_gym_reward("basic_arithmetic")(completions, entry=entries)
    last = reasoning_gym_reward("basic_arithmetic", answer_from="last_number")(completions, entry=entries)
    assert whole[0] == 1.0 and all(r < 0.5 for r in whole[1:])
    assert last == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="answer_from must be one of"):
        reasoning_gym_reward("basic_arithmetic", answer_from="first_number")
