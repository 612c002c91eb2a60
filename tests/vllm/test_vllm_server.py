"""vLLM lane, server mode: `bebop-trl vllm-serve`'s server drafts with the head and exposes its counters."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPHead
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.rollout.vllm_backend import read_server_counters
from bebop_trl.vllm_serve import DraftArguments

from .conftest import PROMPTS, free_port, running_server
from .test_vllm_rollouts import K, acceptance_per_position


pytestmark = pytest.mark.vllm


@pytest.fixture
def server(tiny_checkpoints, trained_head, tmp_path):
    """The server `bebop-trl vllm-serve` starts for the tiny Qwen3 and its head (greedy drafts), and its URL."""
    from trl.scripts.vllm_serve import ScriptArguments

    policy_dir, port = tiny_checkpoints["qwen3"], free_port()
    script_args = ScriptArguments(
        model=policy_dir, host="127.0.0.1", port=port, dtype="float32", max_model_len=256, enforce_eager=True
    )
    draft_args = DraftArguments(
        mtp_head=trained_head("qwen3"), num_speculative_tokens=K, draft_sampling="greedy", draft_dir=str(tmp_path)
    )
    with running_server(script_args, draft_args, tmp_path / "server.log") as url:
        yield url, draft_args.mtp_head, policy_dir


def test_server_drafts_with_the_head_and_counts_as_the_torch_engine(server):
    from trl.generation.vllm_client import VLLMClient

    base_url, head_dir, policy_dir = server
    client = VLLMClient(base_url=base_url, connection_timeout=300)  # TRL's client, as the trainer's server mode
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[128:]]
    max_tokens = 32

    before = read_server_counters(base_url)
    completions = client.generate(
        prompts, temperature=0.0, max_tokens=max_tokens, generation_kwargs={"ignore_eos": True}
    )["completion_ids"]
    counters = read_server_counters(base_url) - before

    # Greedy decoding with greedy drafts is deterministic: the engine must emit and accept the same.
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    head = MTPHead.from_pretrained(head_dir, policy=policy)
    output = generate_from_ids(
        policy, tokenizer, prompts, head=head, num_speculative_tokens=K, draft_sampling="greedy",
        max_new_tokens=max_tokens, temperature=0.0, eos_token_id=[],
    )  # fmt: skip
    server_rate = acceptance_per_position(counters)
    same = sum(a == b for a, b in zip(completions, output.completion_ids.tolist(), strict=True))
    print(f"server {server_rate.tolist()} ({counters.num_drafts}), engine {output.stats.acceptance_per_position}")
    assert counters.num_drafts > 500 and counters.accepted_per_position[0] > 0
    assert same >= 0.9 * len(prompts)
    torch.testing.assert_close(server_rate, output.stats.acceptance_per_position, atol=0.005, rtol=0)
