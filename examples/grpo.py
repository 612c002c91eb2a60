"""GRPO with speculative rollouts on a verifiable-reward task.

By default: SmolLM2-135M-Instruct (the embedded model, no hub access) on reasoning-gym's `basic_arithmetic`, scored
by the task's own verifier. Pass a head trained with `examples/train_mtp.py` to draft the rollouts; without one the
trainer is TRL's GRPOTrainer.

    python examples/train_mtp.py --output_dir outputs/smollm2-head --max_steps 300 --use_cpu
    python examples/grpo.py --output_dir outputs/grpo --mtp_head outputs/smollm2-head --use_cpu --max_steps 50
    # two processes on CPU (gloo)
    accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml examples/grpo.py \
        --output_dir outputs/grpo --mtp_head outputs/smollm2-head --use_cpu
    # LoRA policy, TV updates of the head on the fresh rollouts, rollouts generated while training
    python examples/grpo.py --output_dir outputs/grpo --mtp_head outputs/smollm2-head --use_peft \
        --mtp_online_loss tv --async_rollouts
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer
from bebop_trl.embedded import smollm2_path
from bebop_trl.tasks import ANSWER_SOURCES, reasoning_gym_dataset, reasoning_gym_reward


@dataclass
class GRPOScriptArguments:
    """The task; the policy is `ModelConfig.model_name_or_path` and the training settings are `BebopGRPOConfig`."""

    task: str = field(default="basic_arithmetic", metadata={"help": "reasoning-gym task to train on."})
    num_train_prompts: int = field(default=1024, metadata={"help": "Questions to train on."})
    max_terms: int = field(default=2, metadata={"help": "basic_arithmetic: most terms per expression."})
    max_digits: int = field(default=1, metadata={"help": "basic_arithmetic: most digits per number."})
    reward_answer_from: str = field(
        default="completion",
        metadata={
            "help": "What the task's verifier scores: the whole completion, or its last number (numeric tasks).",
            "choices": list(ANSWER_SOURCES),
        },
    )


def main(script_args: GRPOScriptArguments, training_args: BebopGRPOConfig, model_args: ModelConfig) -> None:
    model_path = model_args.model_name_or_path or smollm2_path()
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    task_config = {}
    if script_args.task == "basic_arithmetic":
        task_config = dict(
            min_terms=2, max_terms=script_args.max_terms, min_digits=1, max_digits=script_args.max_digits
        )
    dataset = reasoning_gym_dataset(
        script_args.task, script_args.num_train_prompts, seed=training_args.seed, **task_config
    )

    trainer = BebopGRPOTrainer(
        policy,
        reasoning_gym_reward(script_args.task, answer_from=script_args.reward_answer_from),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, BebopGRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
