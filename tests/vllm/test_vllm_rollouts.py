"""vLLM lane: heads exported for vLLM draft as in the torch engine, and vLLM's speculative output is exact."""

import functools
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl.generation import vllm_generation

from bebop_trl import BebopGRPOTrainer
from bebop_trl.cli import main
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.rollout.vllm_backend import counts_from_llm_metrics
from bebop_trl.speculative import AcceptanceCounts
from bebop_trl.speculative.exactness import chisquare_pvalue, completion_logprobs
from bebop_trl.testing import perturbed_head
from bebop_trl.verification import format_table, verify_engine
from bebop_trl.vllm_plugin import compat

from ..trainers.grpo_helpers import EXACT_PROMPTS, ROWS_PER_PROMPT, TokenReward, first_two_token_laws, grpo_config
from .conftest import PROMPTS, speculative_config


pytestmark = pytest.mark.vllm

K = 3


def vllm_generate(
    llm, prompts: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0, ignore_eos: bool = True
):
    """Completions (token ids) of `n` samples per prompt and the round's spec-decode counters."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    before = counts_from_llm_metrics(llm.get_metrics())
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=ignore_eos, n=n)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    completions = [list(o.token_ids) for out in outputs for o in out.outputs]
    return completions, counts_from_llm_metrics(llm.get_metrics()) - before


def acceptance_per_position(counters: AcceptanceCounts) -> torch.Tensor:
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


def test_verify_engine_fails_the_build_without_its_shim_and_passes_it_with_it(capsys):
    # The command a user runs, on every engine: the torch engine and vLLM with the package's fix pass every case.
    assert main(["verify-engine", "--engine", "all"]) == 0
    table = capsys.readouterr().out
    print(table)
    assert "8 of 8 cases passed." in table
    # The build as installed: at temperature > 0 its rejection sampler samples the wrong law.
    checks = verify_engine(["vllm"], vllm_shims=False)
    print(format_table(checks))
    assert all(not check.passed for check in checks)
    assert all(check.pvalue < 1e-6 for check in checks if check.draft_sampling == "probabilistic"), checks


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
        mtp_online_loss="tv",
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
    # ...and samples from them: its log-probs are the trained policy's (the tiny Llama ties its output layer to the
    # embeddings, which vLLM's CPU backend keeps a packed copy of; see repack_tied_output_layer).
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = tokenizer(PROMPTS[150])["input_ids"]
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=0, n=4, seed=0)
    (output,) = trainer.vllm_generation.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    completions = [list(o.token_ids) for o in output.outputs]
    served = [[next(iter(step.values())).logprob for step in o.logprobs] for o in output.outputs]
    expected = completion_logprobs(trainer.model, [prompt] * 4, completions, temperature=1.0, top_k=0, top_p=1.0)
    for got, want in zip(served, expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0.1, rtol=0)

    # Head: vLLM's CPU backend repacks the draft's linear weights, so check pushes by their effect on acceptance.
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:160]]

    def acceptance_rate() -> float:
        trainer._rollout.push_head()
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


def known_defect_shims() -> list:
    return compat.shims_for(compat.installed_vllm_build())


def test_grpo_on_a_known_biased_build_without_its_shim_is_refused(tiny_llama_dir, trained_head_dir, tmp_path):
    if not known_defect_shims():
        pytest.skip("the installed vLLM build has no known defect")
    with pytest.raises(RuntimeError) as error:
        colocate_grpo_trainer(tiny_llama_dir, trained_head_dir, tmp_path, vllm_compat_shims=False)
    assert "known to sample the wrong law" in str(error.value)
    assert "bebop-trl verify-engine --engine vllm" in str(error.value)
    assert "vllm_allow_inexact=True" in str(error.value)


def test_grpo_vllm_rollouts_follow_the_policy_law_with_the_shim(tiny_llama_dir, tiny_policy, tmp_path, monkeypatch):
    # vLLM's CPU backend would load the float32 checkpoint in bf16: in float32 its log-probs compare to rounding.
    monkeypatch.setattr(vllm_generation, "LLM", functools.partial(vllm_generation.LLM, dtype="float32"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rewards = [TokenReward(0), TokenReward(1)]
    args = grpo_config(
        tmp_path,
        rollout_backend="vllm",
        vllm_mode="colocate",
        vllm_max_model_length=64,
        vllm_enable_sleep_mode=False,
        num_speculative_tokens=2,
        max_completion_length=3,
        # TRL sizes vLLM's batch (max_num_seqs) by this; the round below generates 4096 rollouts.
        per_device_train_batch_size=256,
    )
    trainer = BebopGRPOTrainer(
        tiny_llama_dir,
        rewards,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": EXACT_PROMPTS}),
        processing_class=tokenizer,
        head=perturbed_head(tiny_policy, scale=0.05),
    )
    # The guard applied the build's fix and its self-test (run once, in a child process) passed.
    exactness = trainer._rollout._exactness
    assert exactness.shims == [shim.name for shim in known_defect_shims()]
    assert exactness.law_ok and exactness.logprobs_ok, exactness
    inputs = [{"prompt": prompt} for prompt in EXACT_PROMPTS for _ in range(ROWS_PER_PROMPT)]
    trainer.model.train()  # a training round, without the optimizer step
    batch = trainer._generate_and_score_completions(inputs)
    counters = trainer._rollout._counters
    assert counters.num_drafts > 0 and 0 < counters.num_accepted_tokens < counters.num_draft_tokens

    for index, prompt in enumerate(EXACT_PROMPTS):
        first_law, second_law = first_two_token_laws(
            trainer.model, tokenizer(prompt)["input_ids"], trainer.eos_token_ids
        )
        for reward, law in zip(rewards, (first_law, second_law), strict=True):
            pvalue = chisquare_pvalue(torch.tensor(reward.given[prompt]), law)
            print(f"vLLM GRPO rollouts, {prompt!r}, {reward.__name__}: chi-square p = {pvalue:.3g}")
            assert pvalue > 1e-3, f"{prompt!r}, {reward.__name__}: chi-square p-value {pvalue:.2e}"
        rows = slice(index * ROWS_PER_PROMPT, (index + 1) * ROWS_PER_PROMPT)
        first_tokens = batch["completion_ids"][rows, 0]
        torch.testing.assert_close(
            batch["sampling_per_token_logps"][rows, 0], first_law[first_tokens].log().float(), atol=1e-4, rtol=0
        )

    # vLLM's sampling log-probs against a fresh forward pass of the policy, on every completion token.
    def logprob_error(batch) -> float:
        prompts = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)
        ]
        completions = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(batch["completion_ids"], batch["completion_mask"], strict=True)
        ]
        fresh = completion_logprobs(trainer.model, prompts, completions, temperature=trainer.temperature)
        returned = batch["sampling_per_token_logps"]
        return max(
            abs(returned[row, t].item() - value) for row, values in enumerate(fresh) for t, value in enumerate(values)
        )

    error = logprob_error(batch)
    print(f"largest |vLLM sampling log-prob - policy log-prob| over {len(inputs)} rollouts: {error:.2g}")
    assert error < 1e-3
    # Where the guard finds the build's log-probs wrong, the trainer recomputes them with the policy.
    recomputed = []
    policy_logprobs = trainer._rollout._policy_logprobs
    monkeypatch.setattr(trainer._rollout, "_policy_logprobs", lambda *a: recomputed.append(1) or policy_logprobs(*a))
    trainer._rollout._exactness.logprobs_ok = False
    assert logprob_error(trainer._generate_and_score_completions(inputs)) < 1e-5
    assert recomputed == [1]
