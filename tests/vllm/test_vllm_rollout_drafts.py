"""vLLM lane: rollout drafts as vLLM's draft-free prompt lookup (`ngram`) keep the policy's law and report their
acceptance, and block verification is refused where the installed vLLM would verify token by token."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from bebop_trl import BebopGRPOTrainer
from bebop_trl.modeling.vllm_export import rollout_drafts_speculative_config
from bebop_trl.rollout.vllm_backend import block_verification_unsupported, counts_from_llm_metrics
from bebop_trl.speculative.exactness import chisquare_pvalue, encode_sequences, exact_sequence_law
from bebop_trl.testing import tiny_causal_lm
from bebop_trl.vllm_plugin import compat

from ..trainers.grpo_helpers import grpo_config
from .conftest import PROMPTS


pytestmark = pytest.mark.vllm

VOCAB_SIZE, NUM_TOKENS = 8, 4
# Repeated n-grams: prompt lookup finds matches from the first generated token on, so drafts are verified at every
# position of the law.
PROMPT = [4, 5, 6, 4, 5, 6, 4, 5]


def sample_first_tokens(llm, num_samples: int) -> tuple[torch.Tensor, object]:
    """[num_samples, NUM_TOKENS] completions of PROMPT at T = 1 and the round's spec-decode counters."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    before = counts_from_llm_metrics(llm.get_metrics())
    params = SamplingParams(temperature=1.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * num_samples, params, use_tqdm=False)
    counts = counts_from_llm_metrics(llm.get_metrics()) - before
    return torch.tensor([list(output.outputs[0].token_ids) for output in outputs]), counts


def test_ngram_rollout_drafts_follow_the_policy_law_and_report_acceptance(make_llm, tmp_path):
    policy = tiny_causal_lm("llama", seed=1, vocab_size=VOCAB_SIZE)
    policy.save_pretrained(tmp_path / "policy")
    law = exact_sequence_law(policy, PROMPT, NUM_TOKENS)
    config = rollout_drafts_speculative_config(num_speculative_tokens=3, method="ngram")
    llm = make_llm(config, model=str(tmp_path / "policy"), max_model_len=64)
    assert llm.llm_engine.vllm_config.speculative_config.method == "ngram"

    completions, counts = sample_first_tokens(llm, 4000)
    pvalue = chisquare_pvalue(encode_sequences(completions, torch.ones_like(completions), VOCAB_SIZE), law)
    print(f"ngram drafts, with the build's fixes: chi-square p = {pvalue:.3g}, {counts}")
    # Drafts were verified, and both accepted and rejected: the counters are read as with a head.
    assert counts.num_drafts > 100 and 0 < counts.num_accepted_tokens < counts.num_draft_tokens
    assert counts.accepted_per_position[0] > 0
    assert pvalue > 1e-3

    # The same test on the build as installed catches its known defect (see bebop_trl.vllm_plugin.compat).
    if not compat.shims_for(compat.installed_vllm_build()):
        return
    with compat.shims_applied([], exclusive=True):
        completions, _ = sample_first_tokens(make_llm(config, model=str(tmp_path / "policy"), max_model_len=64), 2000)
    pvalue = chisquare_pvalue(encode_sequences(completions, torch.ones_like(completions), VOCAB_SIZE), law)
    print(f"ngram drafts, build as installed: chi-square p = {pvalue:.3g}")
    assert pvalue < 1e-6


def rollout_drafts_trainer(tiny_llama_dir: str, output_dir, **overrides) -> BebopGRPOTrainer:
    """GRPO on the tiny Llama in a colocated vLLM with rollout drafts and no head (length reward)."""
    args = grpo_config(
        output_dir,
        rollout_backend="vllm",
        vllm_mode="colocate",
        rollout_drafts=True,
        num_speculative_tokens=3,
        vllm_max_model_length=128,
        vllm_enable_sleep_mode=False,
        vllm_self_test=False,  # the guard's self-test is the lane's own test of the build
        **overrides,
    )
    return BebopGRPOTrainer(
        tiny_llama_dir,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:16]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )


def test_grpo_with_rollout_drafts_in_vllm_logs_acceptance_without_a_head(tiny_llama_dir, tmp_path):
    # At a low temperature the untrained tiny policy repeats itself, which prompt lookup drafts from.
    trainer = rollout_drafts_trainer(tiny_llama_dir, tmp_path, max_completion_length=24, temperature=0.2)
    assert trainer.mtp_head is None
    assert trainer.vllm_generation.llm.llm_engine.vllm_config.speculative_config.method == "ngram"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rollout/acceptance_rate" in entry]
    print([{k: v for k, v in entry.items() if k.startswith("rollout/")} for entry in logs])
    assert len(logs) == 2
    assert sum(entry["rollout/draft_tokens"] for entry in logs) > 0
    for entry in logs:
        assert 0.0 <= entry["rollout/acceptance_rate"] <= 1.0


def test_block_verification_is_refused_on_a_build_that_verifies_token_by_token(tiny_llama_dir, tmp_path):
    reason = block_verification_unsupported("ngram")
    if reason is None:
        pytest.skip(f"{compat.installed_vllm_build()} verifies blocks")
    print(f"{compat.installed_vllm_build()}: {reason}")
    with pytest.raises(ValueError, match="needs vLLM's Model Runner V2") as error:
        rollout_drafts_trainer(tiny_llama_dir, tmp_path, rejection_sample_method="block")
    assert str(compat.installed_vllm_build()) in str(error.value)
    assert "rollout_backend='torch'" in str(error.value) and "rejection_sample_method='standard'" in str(error.value)
