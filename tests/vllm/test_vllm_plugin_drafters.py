"""vLLM lane: eagle heads of Qwen2 / Qwen3 policies run in vLLM through this package's plugin drafters."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPHead
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.vllm_plugin import EAGLE_DRAFTERS

from .conftest import PROMPTS, recorded_draft_calls, speculative_config
from .test_vllm_rollouts import K, acceptance_per_position, vllm_generate


pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_qwen_eagle_heads_draft_in_vllm_as_in_the_torch_engine(
    architecture, tiny_checkpoints, trained_head, make_llm, tmp_path, monkeypatch
):
    policy_dir = tiny_checkpoints[architecture]
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    head = MTPHead.from_pretrained(trained_head(architecture), policy=policy)
    exported = (head, head.export_vllm(tmp_path / "draft"))
    llm = make_llm(speculative_config(exported, "greedy"), model=policy_dir)
    drafter = llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config.architectures
    assert drafter == [f"Eagle{head.config.base_architecture}"] and drafter[0] in EAGLE_DRAFTERS
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    held_out = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]

    # The drafter's first call runs over the whole prompt and depends on its inputs only: its output must be the
    # head's on the same inputs (vLLM's own target hidden states), at every position.
    with recorded_draft_calls(llm, monkeypatch) as calls:
        vllm_generate(llm, held_out[:1], n=1, max_tokens=2, temperature=0.0)
    input_ids, positions, hidden_states, vllm_out = (
        calls[0][k] for k in ("input_ids", "positions", "hidden_states", "out")
    )
    assert input_ids.tolist() == [*held_out[0][1:], input_ids[-1].item()]
    with torch.no_grad():
        expected = head(hidden_states[None], input_ids[None], position_ids=positions[None]).last_hidden_state[0]
    torch.testing.assert_close(vllm_out, expected, atol=1e-4, rtol=1e-4)

    # Greedy decoding with greedy drafts is deterministic: both must emit the same tokens and accept the same drafts.
    max_tokens = 32
    completions, counters = vllm_generate(llm, held_out, n=1, max_tokens=max_tokens, temperature=0.0)
    output = generate_from_ids(
        policy, tokenizer, held_out, head=head, num_speculative_tokens=K, draft_sampling="greedy",
        max_new_tokens=max_tokens, temperature=0.0, eos_token_id=[],  # vLLM side: ignore_eos
    )  # fmt: skip
    vllm_rate = acceptance_per_position(counters)
    engine_rate = output.stats.acceptance_per_position
    same = sum(c == e for c, e in zip(completions, output.completion_ids.tolist(), strict=True))
    print(f"{architecture}: vLLM {vllm_rate.tolist()}, engine {engine_rate.tolist()}, {same}/{len(held_out)} same")
    assert engine_rate[0] > 0.05, f"too few accepted drafts for the comparison to mean anything: {engine_rate}"
    assert same >= 0.9 * len(held_out)
    torch.testing.assert_close(vllm_rate, engine_rate, atol=0.005, rtol=0)  # a float tie may flip a draft
