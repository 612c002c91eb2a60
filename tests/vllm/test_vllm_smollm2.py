"""vLLM lane, real model: the shipped SmolLM2 head drafts in vLLM as in the torch engine (`make test-vllm-slow`)."""

import pytest
import torch

from bebop_trl.embedded import load_smollm2, load_smollm2_head, smollm2_path
from bebop_trl.modeling.vllm_export import vllm_speculative_config
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.tasks import reasoning_gym_dataset
from bebop_trl.trainers.mtp_data import prompt_ids_of

from .test_vllm_rollouts import K, acceptance_per_position, assert_rates_agree, vllm_generate


pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2():
    """The embedded policy, the shipped head, and held-out prompts of the head's task (both sides stop at EOS)."""
    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy)
    prompts = prompt_ids_of(reasoning_gym_dataset("basic_arithmetic", 16, seed=7, **DEFAULT_TASK_CONFIG), tokenizer)
    return policy, tokenizer, head, prompts


def smollm2_llm(make_llm, head, folder, draft_sampling: str):
    config = vllm_speculative_config(head.config, folder, num_speculative_tokens=K, draft_sampling=draft_sampling)
    return make_llm(config, model=smollm2_path(), skip_tokenizer_init=False, max_model_len=512)


def engine_run(smollm2, draft_sampling: str, temperature: float, samples: int):
    policy, tokenizer, head, prompts = smollm2
    return generate_from_ids(
        policy, tokenizer, [p for p in prompts for _ in range(samples)], head=head, num_speculative_tokens=K,
        draft_sampling=draft_sampling, max_new_tokens=MAX_TOKENS, temperature=temperature,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_greedy_decoding_emits_and_accepts_as_the_torch_engine(smollm2, make_llm, tmp_path):
    _, _, head, prompts = smollm2
    llm = smollm2_llm(make_llm, head, head.export_vllm(tmp_path), "greedy")
    completions, counters = vllm_generate(llm, prompts, n=1, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=False)
    output = engine_run(smollm2, "greedy", 0.0, samples=1)
    same = sum(a == b for a, b in zip(completions, output.unpadded(output.completion_ids), strict=True))
    vllm_rate = acceptance_per_position(counters)
    print(
        f"greedy T=0: vLLM {vllm_rate.tolist()}, engine {output.stats.acceptance_per_position.tolist()}, {same} same"
    )
    assert same >= 0.9 * len(prompts)
    assert output.stats.acceptance_per_position[0] > 0.3
    torch.testing.assert_close(vllm_rate, output.stats.acceptance_per_position, atol=0.02, rtol=0)


def test_probabilistic_drafting_accepts_as_the_torch_engine(smollm2, make_llm, tmp_path):
    _, _, head, prompts = smollm2
    llm = smollm2_llm(make_llm, head, head.export_vllm(tmp_path), "probabilistic")
    samples = 4
    _, counters = vllm_generate(llm, prompts, n=samples, max_tokens=MAX_TOKENS, ignore_eos=False)
    output = engine_run(smollm2, "probabilistic", 1.0, samples)
    vllm_rate = acceptance_per_position(counters)
    engine_rate, engine_drafts = output.stats.acceptance_per_position, output.stats.num_drafts
    print(f"probabilistic T=1: vLLM {vllm_rate.tolist()} ({counters.num_drafts}), engine {engine_rate.tolist()}")
    assert counters.num_drafts > 1000 and engine_drafts > 1000
    assert engine_rate[0] > 0.3
    assert_rates_agree(vllm_rate, counters.num_drafts, engine_rate, engine_drafts)
