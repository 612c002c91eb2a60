"""`bebop-trl verify-engine`: it passes exact engines and fails biased ones, on the law and on the log-probs."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from bebop_trl.cli import main
from bebop_trl.speculative import SpeculativeGenerator, rejection
from bebop_trl.speculative.exactness import chisquare_pvalue, completion_logprobs
from bebop_trl.testing import tiny_causal_lm
from bebop_trl.verification import EngineCheck, format_table, verify_engine


pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = dict(num_samples=4000, temperatures=(1.0,))


def test_chisquare_pvalue_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    law = torch.rand(40, generator=generator, dtype=torch.float64) ** 4  # uneven: some cells get merged
    law[3] = 0.0  # a cell of probability 0 that no sample hits
    law = law / law.sum()
    for size in (200, 3000):
        samples = torch.multinomial(law, size, replacement=True, generator=generator)
        counts = torch.bincount(samples, minlength=40).double()
        expected = law.double() * size
        small = expected < 5
        observed = np.append(counts[~small].numpy(), counts[small].sum().item())
        merged = np.append(expected[~small].numpy(), expected[small].sum().item())
        assert chisquare_pvalue(samples, law) == pytest.approx(stats.chisquare(observed, merged).pvalue, rel=1e-6)
    assert chisquare_pvalue(torch.tensor([3, 0, 1]), law) == 0.0, "a sample in a cell of probability 0"


def test_completion_logprobs_are_the_processed_log_softmax():
    policy = tiny_causal_lm("llama", seed=1, vocab_size=8)
    prompts, completions = [[4, 5], [6]], [[1, 2, 3], [7]]
    got = completion_logprobs(policy, prompts, completions, temperature=0.7, top_k=5)
    for prompt, completion, values in zip(prompts, completions, got, strict=True):
        logits = policy(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 0.7
        logits[logits < logits.topk(5, dim=-1).values[:, -1:]] = float("-inf")
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(values), expected, atol=1e-5, rtol=0)


def test_torch_engine_passes_every_case():
    checks = verify_engine(["torch"], num_samples=4000)
    assert [(c.draft_sampling, c.temperature) for c in checks] == [
        ("probabilistic", 1.0),
        ("probabilistic", 0.7),
        ("greedy", 1.0),
        ("greedy", 0.7),
    ]
    for check in checks:
        assert check.passed, format_table(checks)
        # Drafts are accepted often but not always, so both the accept and the resample paths ran.
        assert 0.05 < check.acceptance_per_position[0] < 0.9, format_table(checks)
    assert checks[0].acceptance_per_position[2] > 0.05, "the third draft position must be exercised"


def test_a_head_with_a_draft_vocabulary_passes_from_the_command(tmp_path, capsys):
    args = ["verify-engine", "--engine", "torch", "--samples", "4000", "--temperatures", "1.0"]
    assert main([*args, "--draft-vocab", "0", "1", "2", "4", "5", "7", "--json", str(tmp_path / "d.json")]) == 0
    assert "| torch | greedy | 6 of 8 | 1 | 4000 |" in capsys.readouterr().out
    for result in json.loads((tmp_path / "d.json").read_text()):
        assert result["draft_vocab_size"] == 6 and result["law_ok"] and result["logprobs_ok"]
        assert result["acceptance_per_position"][0] > 0.05


def test_a_biased_residual_fails_the_law(monkeypatch):
    # Negative control: resample from p instead of norm(max(0, p - q)) after a rejection.
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    for check in verify_engine(["torch"], **QUICK):
        assert not check.law_ok and check.pvalue < 1e-6, check
        assert check.logprobs_ok, "the log-probs of the emitted tokens are still the policy's"


def test_wrong_sampling_logprobs_fail(monkeypatch):
    generate = SpeculativeGenerator.generate

    def shifted(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        out.logprobs = out.logprobs + 0.01 * out.completion_mask
        return out

    monkeypatch.setattr(SpeculativeGenerator, "generate", shifted)
    (check,) = verify_engine(["torch"], draft_sampling_modes=["probabilistic"], **QUICK)
    assert check.law_ok and not check.logprobs_ok and not check.passed
    assert check.logprob_error == pytest.approx(0.01, abs=1e-4)
    assert "FAIL (log-probs)" in format_table([check])


def test_missing_logprobs_fail():
    check = EngineCheck("e", "greedy", 1.0, 10, pvalue=0.5, acceptance_per_position=[0.5], logprob_error=None)
    assert check.law_ok and not check.passed
    assert "none returned" in format_table([check])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Unknown engine"):
        verify_engine(["sglang"])
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        verify_engine(["torch"], temperatures=(0.0,))


def test_command_prints_the_table_writes_json_and_exits_non_zero_on_failure(tmp_path, capsys, monkeypatch):
    args = ["verify-engine", "--engine", "torch", "--samples", "3000", "--temperatures", "1.0"]
    assert main([*args, "--json", str(tmp_path / "ok.json")]) == 0
    printed = capsys.readouterr().out
    assert "| torch | probabilistic | 8 of 8 | 1 | 3000 |" in printed and "2 of 2 cases passed." in printed
    results = json.loads((tmp_path / "ok.json").read_text())
    assert [r["draft_sampling"] for r in results] == ["probabilistic", "greedy"]
    assert all(r["law_ok"] and r["logprobs_ok"] for r in results)

    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    assert main(args) == 1
    assert "FAIL (law)" in capsys.readouterr().out
