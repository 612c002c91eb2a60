"""Splitting a task's prompts into training and held-out sets."""

import pytest

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
