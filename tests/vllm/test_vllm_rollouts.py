"""vLLM lane: heads exported for vLLM draft as in the torch engine, and vLLM's speculative output is exact."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from bebop_trl import BebopGRPOTrainer
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.rollout.vllm_backend import SpecDecodeCounters

from ..speculative.helpers import chisquare_pvalue, encode_sequences, exact_sequence_law
from ..trainers.grpo_helpers import grpo_config
from .conftest import PROMPTS, speculative_config
from .vllm_cpu_workaround import expand_batch_to_tokens, rejection_sampler_expand


pytestmark = pytest.mark.vllm

K = 3


def test_workaround_expands_like_the_documented_example():
    x = torch.tensor([5.0, 0.0, 7.0])
    expanded = expand_batch_to_tokens(x, torch.tensor([2, 5, 6]), 6, replace_from=0, replace_to=1)
    assert expanded.tolist() == [5.0, 5.0, 1.0, 1.0, 1.0, 7.0]


def vllm_generate(
    llm, prompts: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0, ignore_eos: bool = True
):
    """Completions (token ids) of `n` samples per prompt and the round's spec-decode counters."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    before = SpecDecodeCounters.from_llm_metrics(llm.get_metrics())
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=ignore_eos, n=n)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    completions = [list(o.token_ids) for out in outputs for o in out.outputs]
    return completions, SpecDecodeCounters.from_llm_metrics(llm.get_metrics()) - before


def acceptance_per_position(counters: SpecDecodeCounters) -> torch.Tensor:
    """[K] fraction of vLLM's draft cycles whose j-th draft was accepted (as `AcceptanceStats` measures it)."""
    return torch.tensor(counters.accepted_per_position[:K], dtype=torch.float64) / counters.num_drafts


def assert_rates_agree(vllm_rate: torch.Tensor, vllm_drafts: int, engine_rate: torch.Tensor, engine_drafts: int):
    """Per position, |vLLM - engine| within 5 standard errors + 0.01: acceptance events of one sequence are
    correlated, hence the wide margin."""
    for j in range(K):
        p, q = vllm_rate[j].item(), engine_rate[j].item()
        standard_error = math.sqrt(p * (1 - p) / vllm_drafts + q * (1 - q) / engine_drafts)
        assert abs(p - q) <= 5 * standard_error + 0.01, (j, vllm_rate.tolist(), engine_rate.tolist())


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_vllm_acceptance_per_position_matches_the_torch_engine(
    draft_sampling, make_llm, exported_head, tiny_policy, tiny_llama_dir
):
    head, _ = exported_head
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]  # prompts the head was not trained on
    samples, max_tokens = 4, 32
    llm = make_llm(speculative_config(exported_head, draft_sampling))
    _, counters = vllm_generate(llm, held_out, samples, max_tokens)
    vllm_rate = acceptance_per_position(counters)

    output = generate_from_ids(
        tiny_policy,
        tokenizer,
        [p for p in held_out for _ in range(samples)],
        head=head,
        num_speculative_tokens=K,
        draft_sampling=draft_sampling,
        max_new_tokens=max_tokens,
        temperature=1.0,
        eos_token_id=[],  # vLLM side runs with ignore_eos: both generate max_tokens per sample
        generator=torch.Generator().manual_seed(0),
    )
    engine_rate, engine_drafts = output.stats.acceptance_per_position, output.stats.num_drafts

    print(f"{draft_sampling}: vLLM {vllm_rate.tolist()} ({counters.num_drafts} cycles), engine {engine_rate.tolist()}")
    assert counters.num_drafts > 1000 and engine_drafts > 1000
    # Greedy drafts are accepted with probability p(argmax q), low on this high-entropy tiny model at T = 1.
    floor = {"probabilistic": 0.3, "greedy": 0.01}[draft_sampling]
    assert engine_rate[0] > floor, f"too few accepted drafts for the comparison to mean anything: {engine_rate}"
    assert_rates_agree(vllm_rate, counters.num_drafts, engine_rate, engine_drafts)


def test_vllm_speculative_output_is_exact_only_with_the_workaround(
    make_llm, exported_head, tiny_policy, tiny_llama_dir
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer("3+4=")["input_ids"]
    vocab_size = tiny_policy.get_output_embeddings().weight.shape[0]
    # The law of the first two tokens: the second one is the first that passes vLLM's rejection sampler.
    law = exact_sequence_law(tiny_policy, prompt, 2)
    llm = make_llm(speculative_config(exported_head, "probabilistic"))

    def pvalue() -> float:
        completions, counters = vllm_generate(llm, [prompt], n=4000, max_tokens=2)
        assert counters.num_drafts > 0
        ids = torch.tensor(completions)
        return chisquare_pvalue(encode_sequences(ids, torch.ones_like(ids), vocab_size), law)

    with rejection_sampler_expand(fixed=False):
        build = pvalue()
    fixed = pvalue()
    print(f"chi-square p-value of vLLM's speculative output: build {build:.3g}, with the workaround {fixed:.3g}")
    assert build < 1e-6, f"the vllm-cpu build's output matched the target law (p = {build}): is the defect gone?"
    assert fixed > 1e-3, f"with the workaround vLLM's output is not distributed as the target (p = {fixed})"


def colocate_grpo_trainer(tiny_llama_dir: str, trained_head_dir: str, output_dir, **overrides) -> BebopGRPOTrainer:
    """GRPO on the tiny Llama with the trained head drafting inside a colocated vLLM (length reward)."""
    args = grpo_config(
        output_dir,
        rollout_backend="vllm",
        vllm_mode="colocate",
        mtp_head=trained_head_dir,
        num_speculative_tokens=K,
        vllm_max_model_length=128,
        **overrides,
    )
    return BebopGRPOTrainer(
        tiny_llama_dir,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:16]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )


def test_grpo_with_vllm_colocate_drafts_with_the_head(tiny_llama_dir, trained_head_dir, tmp_path):
    trainer = colocate_grpo_trainer(
        tiny_llama_dir, trained_head_dir, tmp_path, max_completion_length=24, vllm_enable_sleep_mode=False
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rollout/acceptance_rate" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["rollout/draft_tokens"] > 0
        assert 0.0 < entry["rollout/acceptance_rate"] <= 1.0
        assert entry["rollout/acceptance_position_1"] >= entry["rollout/acceptance_position_3"]
    assert trainer.vllm_generation.llm.llm_engine.vllm_config.speculative_config.method == "eagle"


def test_online_head_updates_and_policy_updates_reach_vllm(tiny_llama_dir, trained_head_dir, tmp_path):
    trainer = colocate_grpo_trainer(
        tiny_llama_dir,
        trained_head_dir,
        tmp_path,
        mtp_online_update="tv",
        learning_rate=0.05,  # policy steps far larger than the bf16 rounding of vLLM's copy
        max_completion_length=16,
    )
    tokenizer = trainer.processing_class
    initial_embedding = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    assert any("mtp_online/loss" in entry for entry in trainer.state.log_history)

    # Policy: after a sync, vLLM's target holds the trained weights (the embedding is stored unpacked on CPU).
    trainer.vllm_generation.sync_weights()
    runner = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner
    policy_embedding = trainer.model.get_input_embeddings().weight.detach()
    vllm_embedding = runner.get_model().model.embed_tokens.weight[: len(policy_embedding)].float()
    assert (policy_embedding - initial_embedding).abs().max() > 0.05
    torch.testing.assert_close(vllm_embedding, policy_embedding, atol=1e-2, rtol=1e-2)

    # Head: vLLM's CPU backend repacks the draft's linear weights, so check pushes by their effect on acceptance.
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:160]]

    def acceptance_rate() -> float:
        trainer._push_head_to_vllm()
        _, counters = vllm_generate(trainer.vllm_generation.llm, held_out, n=4, max_tokens=24)
        return counters.num_accepted_tokens / counters.num_draft_tokens

    trained_state = {k: v.clone() for k, v in trainer.mtp_head.state_dict().items()}
    trained = acceptance_rate()
    with torch.no_grad():
        for param in trainer.mtp_head.parameters():
            param.add_(torch.randn_like(param))
    scrambled = acceptance_rate()
    trainer.mtp_head.load_state_dict(trained_state)
    restored = acceptance_rate()
    assert scrambled < trained - 0.1, (trained, scrambled)
    assert abs(restored - trained) < 0.05, (trained, restored)
