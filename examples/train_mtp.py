"""Train an MTP head on a frozen policy before RL.

By default: SmolLM2-135M-Instruct (the embedded model, no hub access), prompts of a reasoning-gym task,
completions self-distilled from the policy at the RL temperature, and the end-to-end TV loss.

    python examples/train_mtp.py --output_dir outputs/smollm2-head --max_steps 300
    accelerate launch --config_file examples/accelerate_configs/single_process.yaml examples/train_mtp.py \
        --output_dir outputs/smollm2-head --loss_type tv
    # from a self-distilled corpus (build_distill_corpus): the policy never runs for training
    python examples/train_mtp.py --corpus_dir outputs/corpora/smollm2-basic-arithmetic-t1 --draft_vocab_size 1024 \
        --train_sampling_strategy group_by_length --output_dir outputs/smollm2-head
    # two processes on CPU (gloo)
    accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml examples/train_mtp.py \
        --output_dir outputs/smollm2-head --use_cpu
    # any Hub model and dataset on GPUs
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_mtp.py \
        --model_name_or_path Qwen/Qwen3-8B --dataset_name my-org/prompts --dtype bfloat16 --bf16 --output_dir qwen3-8b-head
"""

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from bebop_trl import MTPConfig, MTPTrainer
from bebop_trl.embedded import smollm2_path
from bebop_trl.tasks import reasoning_gym_split
from bebop_trl.trainers.distill_corpus import load_distill_corpus
from bebop_trl.trainers.mtp_data import prompt_ids_of


@dataclass
class TrainMTPArguments:
    """What to train on; the training settings are the fields of `MTPConfig`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy to train a head for (default: the embedded SmolLM2-135M-Instruct)."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the frozen policy ('auto': the checkpoint's). The head trains in float32 whatever it is.",
            "choices": ["float32", "bfloat16", "auto"],
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of a dataset (default: prompts of the reasoning-gym `task`)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of `dataset_name`."})
    corpus_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a self-distilled corpus (build_distill_corpus) to train on instead of a dataset: it "
            "brings the policy's hidden states, so training never runs the policy. Evaluation prompts found in it "
            "are dropped."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (None: none)."})
    task: str = field(default="basic_arithmetic", metadata={"help": "reasoning-gym task of the default prompts."})
    num_train_prompts: int = field(default=512, metadata={"help": "Prompts of the default task to train on."})
    num_eval_prompts: int = field(default=32, metadata={"help": "Held-out prompts of the default task."})
    max_terms: int | None = field(
        default=None, metadata={"help": "basic_arithmetic: most terms per expression (None: the task's default)."}
    )
    max_digits: int | None = field(
        default=None, metadata={"help": "basic_arithmetic: most digits per number (None: the task's default)."}
    )


def main(script_args: TrainMTPArguments, training_args: MTPConfig) -> None:
    model_path = script_args.model_name_or_path or smollm2_path()
    dtype = "auto" if script_args.dtype == "auto" else getattr(torch, script_args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if script_args.dataset_name:
        data = load_dataset(script_args.dataset_name, script_args.dataset_config)
        train_dataset = data[script_args.dataset_train_split]
        eval_dataset = data[script_args.dataset_test_split] if script_args.dataset_test_split else None
    else:
        task_config = {}
        if script_args.max_terms is not None:
            task_config.update(min_terms=min(2, script_args.max_terms), max_terms=script_args.max_terms)
        if script_args.max_digits is not None:
            task_config.update(min_digits=1, max_digits=script_args.max_digits)
        # One pool split in two: a second seed would repeat the first one's questions (reasoning-gym draws item i
        # with seed + i).
        train_dataset, eval_dataset = reasoning_gym_split(
            script_args.task,
            script_args.num_train_prompts,
            script_args.num_eval_prompts,
            seed=training_args.seed,
            **task_config,
        )

    if script_args.corpus_dir:
        train_dataset = load_distill_corpus(script_args.corpus_dir)
        if eval_dataset is not None:
            eval_dataset = without_corpus_prompts(eval_dataset, train_dataset, tokenizer)

    trainer = MTPTrainer(policy, training_args, train_dataset, eval_dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_dataset is not None:
        trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def without_corpus_prompts(eval_dataset, corpus, tokenizer):
    """The evaluation rows whose prompt the corpus never sampled (compared as token ids)."""
    ids = corpus.select_columns(["input_ids", "prompt_length"])
    seen = {tuple(row[:n]) for row, n in zip(ids["input_ids"], ids["prompt_length"], strict=True)}
    keep = [i for i, prompt in enumerate(prompt_ids_of(eval_dataset, tokenizer)) if tuple(prompt) not in seen]
    if len(keep) < len(eval_dataset):
        print(f"Dropped {len(eval_dataset) - len(keep)} evaluation prompts that the corpus was sampled on.")
    return eval_dataset.select(keep)


if __name__ == "__main__":
    parser = TrlParser((TrainMTPArguments, MTPConfig))
    main(*parser.parse_args_and_config())
