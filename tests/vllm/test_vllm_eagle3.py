"""vLLM lane: eagle3 heads export as vLLM's `Eagle3LlamaForCausalLM`, draft as in the torch engine and keep the
policy's law."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPConfig, MTPTrainer
from bebop_trl.modeling import select_draft_vocab
from bebop_trl.modeling.vllm_export import VLLM_EAGLE3_ARCHITECTURE
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.rollout.vllm_backend import _model_runner
from bebop_trl.verification import format_table, verify_engine

from .conftest import PROMPTS, speculative_config
from .test_vllm_rollouts import K, acceptance_per_position, vllm_generate


pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("draft_vocab", [None, [0, 1, 2, 4, 5, 7]])
def test_eagle3_heads_sample_the_policy_law_in_vllm(draft_vocab):
    checks = verify_engine(
        ["torch", "vllm"], num_samples=4000, temperatures=(1.0,), draft_vocab=draft_vocab, layout="eagle3"
    )
    assert all(check.passed for check in checks), format_table(checks)
    by_mode = {}
    for check in checks:
        by_mode.setdefault(check.draft_sampling, []).append(check.acceptance_per_position[0])
    for mode, (torch_rate, vllm_rate) in by_mode.items():
        assert torch_rate > 0.05 and abs(torch_rate - vllm_rate) < 0.04, (mode, format_table(checks))


@pytest.fixture(scope="module")
def trained_eagle3(tiny_llama_dir, tmp_path_factory):
    """An eagle3 head trained (e2e_tv) on the tiny Llama's own samples, fusing both of its layers."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = MTPConfig(
        output_dir=str(tmp_path_factory.mktemp("eagle3")), head_layout="eagle3", head_aux_layers=[0, 1],
        loss_type="e2e_tv", max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3, num_mtp_steps=3,
        num_speculative_tokens=3, distill_max_new_tokens=24, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = MTPTrainer(policy, args, Dataset.from_dict({"prompt": PROMPTS[:128]}), processing_class=tokenizer)
    trainer.train()
    return policy, tokenizer, trainer.head.eval()


@pytest.mark.parametrize("restricted", [False, True])
def test_eagle3_heads_draft_in_vllm_as_in_the_torch_engine(
    trained_eagle3, tiny_llama_dir, make_llm, tmp_path, restricted
):
    policy, tokenizer, head = trained_eagle3
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]
    max_tokens = 32
    if restricted:
        samples = generate_from_ids(policy, tokenizer, held_out, max_new_tokens=max_tokens, temperature=0.0,
                                    eos_token_id=[])  # fmt: skip
        emitted = {t for row in samples.completion_ids.tolist() for t in row}
        head = head.with_draft_vocab(
            select_draft_vocab(
                policy.config.vocab_size, sequences=samples.completion_ids.tolist(), size=len(emitted) // 2
            )
        ).eval()
    llm = make_llm(speculative_config((head, head.export_vllm(tmp_path / "draft")), "greedy"), model=tiny_llama_dir)
    draft_config = llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config
    assert draft_config.architectures == [VLLM_EAGLE3_ARCHITECTURE]
    assert llm.llm_engine.vllm_config.speculative_config.method == "eagle3"
    draft_model = _model_runner(llm).get_draft_model()
    assert draft_model.lm_head.weight.shape[0] >= (head.config.draft_vocab_size or policy.config.vocab_size)

    # Greedy decoding with greedy drafts is deterministic: both emit the same tokens and accept the same drafts.
    completions, counters = vllm_generate(llm, held_out, n=1, max_tokens=max_tokens, temperature=0.0)
    output = generate_from_ids(
        policy, tokenizer, held_out, head=head, num_speculative_tokens=K, draft_sampling="greedy",
        max_new_tokens=max_tokens, temperature=0.0, eos_token_id=[],
    )  # fmt: skip
    vllm_rate, engine_rate = acceptance_per_position(counters), output.stats.acceptance_per_position
    same = sum(c == e for c, e in zip(completions, output.completion_ids.tolist(), strict=True))
    print(f"eagle3, D = {head.config.draft_vocab_size}: vLLM {vllm_rate.tolist()}, engine {engine_rate.tolist()}")
    assert engine_rate[0] > 0.05, f"too few accepted drafts for the comparison to mean anything: {engine_rate}"
    assert same >= 0.9 * len(held_out)
    torch.testing.assert_close(vllm_rate, engine_rate, atol=0.005, rtol=0)  # a float tie may flip a draft
