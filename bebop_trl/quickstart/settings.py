"""Settings of the quickstart: what it runs on and the budget of every stage, for the full and the `--fast` run."""

import dataclasses
from dataclasses import dataclass
from typing import Any


DEFAULT_TASK = "basic_arithmetic"
# The difficulty the head shipped for SmolLM2-135M-Instruct was trained on.
DEFAULT_TASK_CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}

# Budgets of `--fast`: every stage runs, on a few prompts and a few tokens.
FAST_BUDGETS = dict(
    num_train_prompts=16,
    distill_max_new_tokens=32,
    train_steps=8,
    train_batch_size=4,
    num_eval_prompts=4,
    eval_max_new_tokens=16,
    speed_prompts_batch_1=1,
    speed_batches_batch_8=1,
    speed_repeats=1,
    speed_max_new_tokens=24,
    step_cost_repeats=3,
    grpo_steps=2,
    grpo_batch_size=4,
    grpo_max_completion_length=24,
)


@dataclass
class QuickstartSettings:
    """What the quickstart runs on, and how much of each stage it runs.

    The defaults are the full run (under 15 minutes on 2 CPU cores with SmolLM2-135M-Instruct);
    [`create`][bebop_trl.quickstart.QuickstartSettings.create] with `fast=True` gives the smoke run.

    Attributes:
        output_dir: Where the report, plots, heads and run folders go.
        model: A Hub id or folder of a causal LM; None for the embedded SmolLM2-135M-Instruct and its shipped head.
        task: A reasoning-gym task name.
        seed: Seed of the prompts, of the sampling and of the training runs.
        fast: Whether these are the smoke-run budgets (recorded in the report).
        temperature: Sampling temperature of every stage (the RL temperature).
        num_speculative_tokens: Draft length k of the acceptance measurement and of the GRPO rollouts.
        speed_num_speculative_tokens: Draft length of the speed measurement. Two by default: on a CPU a verify pass
            over 4 tokens costs about 1.5 decode steps against 1.1 over 3, so k = 2 is the fastest fixed length
            there (see the draft-length benchmark); on a GPU k = 3 pays more often.
        num_train_prompts: Task prompts self-distilled for head training.
        distill_max_new_tokens: Longest self-distilled completion.
        distill_batch_size: Prompts per self-distillation batch.
        train_steps: Optimizer steps of each head (the same for both losses).
        train_batch_size: Sequences per head-training step.
        learning_rate: AdamW learning rate of both heads.
        num_mtp_steps: Draft steps unrolled in head training.
        num_eval_prompts: Held-out prompts of the acceptance measurement.
        eval_max_new_tokens: Tokens generated per held-out prompt.
        eval_batch_size: Prompts per generation batch of the acceptance measurement.
        speed_prompts_batch_1: Prompts generated one at a time per repeat of the speed measurement.
        speed_batches_batch_8: Batches of 8 prompts per repeat of the speed measurement.
        speed_repeats: Rounds of the speed measurement (each runs every prompt with and without the head).
        speed_max_new_tokens: Tokens generated per prompt in the speed measurement.
        speed_draft_sampling: Drafting mode of the speed measurement.
        step_cost_repeats: Timed rounds of the step-cost measurement (medians are reported).
        grpo_steps: Optimizer steps of the GRPO run.
        grpo_batch_size: Completions per GRPO step.
        grpo_num_generations: Completions per prompt (the GRPO group size).
        grpo_max_completion_length: Longest GRPO completion.
        grpo_draft_sampling: Drafting mode of the GRPO rollouts.
        grpo_reward_answer_from: What the GRPO reward scores: the completion's last number (the 135M policy earns
            it often enough to learn from; `benchmarks/reward_signal.py`), or the whole completion.
    """

    output_dir: str = "outputs/quickstart"
    model: str | None = None
    task: str = DEFAULT_TASK
    seed: int = 0
    fast: bool = False
    temperature: float = 1.0
    num_speculative_tokens: int = 3
    speed_num_speculative_tokens: int = 2
    num_train_prompts: int = 128
    distill_max_new_tokens: int = 64
    distill_batch_size: int = 16
    train_steps: int = 64
    train_batch_size: int = 4
    learning_rate: float = 3e-4
    num_mtp_steps: int = 3
    num_eval_prompts: int = 16
    eval_max_new_tokens: int = 48
    eval_batch_size: int = 8
    speed_prompts_batch_1: int = 4
    speed_batches_batch_8: int = 1
    speed_repeats: int = 2
    speed_max_new_tokens: int = 64
    speed_draft_sampling: str = "probabilistic"
    step_cost_repeats: int = 15
    grpo_steps: int = 4
    grpo_batch_size: int = 8
    grpo_num_generations: int = 4
    grpo_max_completion_length: int = 64
    grpo_draft_sampling: str = "probabilistic"
    grpo_reward_answer_from: str = "last_number"

    @classmethod
    def create(cls, fast: bool = False, **fields: Any) -> "QuickstartSettings":
        """The full-run settings, or the `--fast` budgets with `fast=True`; `fields` override either.

        Raises:
            TypeError: On an unknown field.
        """
        budgets = FAST_BUDGETS if fast else {}
        return cls(**{**budgets, **fields, "fast": fast})

    @property
    def uses_embedded_model(self) -> bool:
        """Whether the run is on the embedded SmolLM2-135M-Instruct, which has a shipped head."""
        return self.model is None

    def task_config(self) -> dict[str, Any]:
        """Generator settings of the task: the shipped head's difficulty for the default task, else the task's own."""
        return dict(DEFAULT_TASK_CONFIG) if self.task == DEFAULT_TASK else {}

    def to_dict(self) -> dict[str, Any]:
        """Every setting, plus the task's generator settings, as JSON values."""
        return {**dataclasses.asdict(self), "task_config": self.task_config()}
