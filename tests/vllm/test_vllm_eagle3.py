"""vLLM lane: eagle3 heads export as vLLM's `Eagle3LlamaForCausalLM`, draft as in the torch engine and keep the
policy's law."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPConfig, MTPTrainer
from bebop_trl.modeling.vllm_export import VLLM_EAGLE3_ARCHITECTURE
from bebop_trl.rollout.vllm_backend import _model_runner

from .conftest import PROMPTS, speculative_config
from .test_vllm_draft_vocab import (
    assert_both_engines_sample_the_law,
    assert_greedy_drafts_match_the_engine,
    half_of_the_emitted_tokens,
)


pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("draft_vocab", [None, [0, 1, 2, 4, 5, 7]])
def test_eagle3_heads_sample_the_policy_law_in_vllm(draft_vocab):
    assert_both_engines_sample_the_law(draft_vocab=draft_vocab, layout="eagle3")


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
        head = head.with_draft_vocab(half_of_the_emitted_tokens(policy, tokenizer, held_out, max_tokens)).eval()
    llm = make_llm(speculative_config((head, head.export_vllm(tmp_path / "draft")), "greedy"), model=tiny_llama_dir)
    draft_config = llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config
    assert draft_config.architectures == [VLLM_EAGLE3_ARCHITECTURE]
    assert llm.llm_engine.vllm_config.speculative_config.method == "eagle3"
    draft_model = _model_runner(llm).get_draft_model()
    assert draft_model.lm_head.weight.shape[0] >= (head.config.draft_vocab_size or policy.config.vocab_size)

    assert_greedy_drafts_match_the_engine(llm, policy, tokenizer, head, held_out, max_tokens)


@pytest.mark.parametrize("restricted", [False, True])
def test_eagle3_heads_in_the_speculators_format_run_in_vllm_by_themselves(
    trained_eagle3, tiny_llama_dir, make_llm, tmp_path, restricted
):
    """`vllm serve <folder>` needs nothing but the folder: vLLM finds the verifier and the drafter in its config,
    and drafts as the torch engine does."""
    policy, tokenizer, head = trained_eagle3
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]
    max_tokens = 32
    if restricted:
        head = head.with_draft_vocab(half_of_the_emitted_tokens(policy, tokenizer, held_out, max_tokens)).eval()
    folder = head.export_vllm(tmp_path / "speculator", speculators_verifier=tiny_llama_dir, num_speculative_tokens=3)

    llm = make_llm(model=folder)
    speculative = llm.llm_engine.vllm_config.speculative_config
    assert llm.llm_engine.vllm_config.model_config.model == tiny_llama_dir
    assert (speculative.method, speculative.num_speculative_tokens) == ("eagle3", 3)
    assert speculative.draft_model_config.hf_config.architectures == [VLLM_EAGLE3_ARCHITECTURE]
    assert_greedy_drafts_match_the_engine(llm, policy, tokenizer, head, held_out, max_tokens)
