"""vLLM lane: eagle heads with a reduced draft vocabulary run in vLLM through the plugin's `EagleDraftVocab*`
drafters, draft as in the torch engine and keep the policy's law."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPHead
from bebop_trl.modeling import select_draft_vocab
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.rollout.vllm_backend import _model_runner
from bebop_trl.verification import format_table, verify_engine
from bebop_trl.vllm_plugin import EAGLE_DRAFTERS

from .conftest import PROMPTS, speculative_config
from .test_vllm_rollouts import K, acceptance_per_position, vllm_generate


pytestmark = pytest.mark.vllm


def test_draft_vocabulary_heads_sample_the_policy_law_in_vllm():
    assert_both_engines_sample_the_law(draft_vocab=[0, 1, 2, 4, 5, 7])


def assert_both_engines_sample_the_law(**head_options):
    """verify_engine on torch and vLLM with a head of `head_options`: both sample the exact law, and accept the first
    draft about as often."""
    checks = verify_engine(["torch", "vllm"], num_samples=4000, temperatures=(1.0,), **head_options)
    assert all(check.passed for check in checks), format_table(checks)
    by_mode = {}
    for check in checks:
        by_mode.setdefault(check.draft_sampling, []).append(check.acceptance_per_position[0])
    for mode, (torch_rate, vllm_rate) in by_mode.items():
        assert torch_rate > 0.05 and abs(torch_rate - vllm_rate) < 0.04, (mode, format_table(checks))


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_draft_vocabulary_heads_draft_in_vllm_as_in_the_torch_engine(
    architecture, tiny_checkpoints, trained_head, make_llm, tmp_path
):
    policy_dir = tiny_checkpoints[architecture]
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    trained = MTPHead.from_pretrained(trained_head(architecture), policy=policy)
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]
    max_tokens = 32
    draft_vocab = half_of_the_emitted_tokens(policy, tokenizer, held_out, max_tokens)
    head = MTPHead.from_model(policy, num_layers=trained.config.num_layers, draft_vocab=draft_vocab)
    head.load_state_dict(trained.state_dict(), strict=False)  # the trained weights; D's rows are the policy's
    head.eval()

    llm = make_llm(speculative_config((head, head.export_vllm(tmp_path / "draft")), "greedy"), model=policy_dir)
    drafter = llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config.architectures
    assert drafter == [f"EagleDraftVocab{head.config.base_architecture}"] and drafter[0] in EAGLE_DRAFTERS
    draft_model = _model_runner(llm).get_draft_model()
    assert draft_model.lm_head.weight.shape[0] >= len(draft_vocab)  # its own rows (vLLM pads them), not shared

    assert_greedy_drafts_match_the_engine(llm, policy, tokenizer, head, held_out, max_tokens)


def half_of_the_emitted_tokens(policy, tokenizer, prompts: list[list[int]], max_tokens: int) -> torch.Tensor:
    """A draft vocabulary of the most frequent half of the tokens the policy emits greedily on `prompts`, so that
    some drafts a full-vocabulary head would make fall outside it."""
    samples = generate_from_ids(
        policy, tokenizer, prompts, max_new_tokens=max_tokens, temperature=0.0, eos_token_id=[]
    )
    emitted = {t for row in samples.completion_ids.tolist() for t in row}
    return select_draft_vocab(
        policy.config.vocab_size, sequences=samples.completion_ids.tolist(), size=len(emitted) // 2
    )


def assert_greedy_drafts_match_the_engine(llm, policy, tokenizer, head, prompts: list[list[int]], max_tokens: int):
    """Greedy decoding with greedy drafts is deterministic: vLLM and the torch engine emit the same tokens and accept
    the same drafts."""
    completions, counters = vllm_generate(llm, prompts, n=1, max_tokens=max_tokens, temperature=0.0)
    output = generate_from_ids(
        policy, tokenizer, prompts, head=head, num_speculative_tokens=K, draft_sampling="greedy",
        max_new_tokens=max_tokens, temperature=0.0, eos_token_id=[],
    )  # fmt: skip
    vllm_rate, engine_rate = acceptance_per_position(counters), output.stats.acceptance_per_position
    same = sum(c == e for c, e in zip(completions, output.completion_ids.tolist(), strict=True))
    print(
        f"{head.config.layout}, D = {head.config.draft_vocab_size}: vLLM {vllm_rate.tolist()}, engine {engine_rate.tolist()}"
    )
    assert engine_rate[0] > 0.05, f"too few accepted drafts for the comparison to mean anything: {engine_rate}"
    assert same >= 0.9 * len(prompts)
    torch.testing.assert_close(vllm_rate, engine_rate, atol=0.005, rtol=0)  # a float tie may flip a draft
