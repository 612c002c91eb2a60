"""The one logits -> distribution function, checked against `transformers`' logits warpers."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bebop_trl.speculative import probs_from_logits, process_logits, sample, validate_sampling_params

from .helpers import chisquare_pvalue


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.6, 10, 0.9), (1.0, 3, 0.5), (2.0, 0, 0.05)],
)
def test_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = logits.reshape(-1, 50)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(-1).reshape(logits.shape)
    torch.testing.assert_close(probs_from_logits(logits, temperature, top_k, top_p), expected)
    assert (process_logits(logits, temperature, top_k, top_p).isinf() == (expected == 0)).all()


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.randn(5, 20, dtype=torch.bfloat16)
    probs = probs_from_logits(logits, temperature=0, top_k=3, top_p=0.5)
    assert probs.dtype == torch.float32
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(5)) and torch.equal(probs.max(-1).values, torch.ones(5))


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.05, 0.0, 0.25, 0.7])
    draws = sample(probs.expand(2, 20_000, 4), torch.Generator().manual_seed(0))
    assert draws.shape == (2, 20_000)
    assert chisquare_pvalue(draws.flatten(), probs) > 1e-4


def test_sample_takes_unnormalised_rows_and_never_draws_a_token_of_probability_zero():
    # Zero mass at both ends and in the middle, rows of different totals (residuals are not normalised).
    law = torch.tensor([0.0, 0.05, 0.0, 0.25, 0.7, 0.0])
    rows = torch.stack([law * 3.0, law * 1e-3, law.flip(0)])
    draws = sample(rows.unsqueeze(1).expand(3, 20_000, 6), torch.Generator().manual_seed(1))
    assert chisquare_pvalue(draws[0], law) > 1e-4 and chisquare_pvalue(draws[1], law) > 1e-4
    assert chisquare_pvalue(draws[2], law.flip(0)) > 1e-4
    assert set(draws[:2].unique().tolist()) <= {1, 3, 4} and set(draws[2].unique().tolist()) <= {1, 2, 4}


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(-0.1, 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5)]
)
def test_out_of_range_parameters_raise(temperature, top_k, top_p):
    with pytest.raises(ValueError):
        validate_sampling_params(temperature, top_k, top_p)
