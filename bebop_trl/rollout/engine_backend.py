"""Rollout backends on the torch engine: every round generated now, or the next round generated in the background."""

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..modeling import MTPHead
from ..speculative import GenerationOutput, RolloutDrafter
from ..speculative.draft_length import AdaptiveDraftLength, calibrate_draft_length
from .async_worker import AsyncRolloutWorker, Lookahead
from .base import RolloutBackend, RolloutResult, current_policy, reject_images
from .torch_engine import generate_from_ids, padded_prompts


class EngineRollout(RolloutBackend):
    """The [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator] on the trainer's current policy weights.

    Every round draws from its own random stream, seeded by the run's seed, the process and the round (evaluation
    rounds count down from -1), so a run is reproducible and an evaluation never shifts the training rounds. With
    `adaptive_draft_length` the step costs are calibrated once, on the first round's prompts, and one draft-length
    policy then serves every round. With `rollout_drafts` one
    [`RolloutDrafter`][bebop_trl.speculative.rollout_drafts.RolloutDrafter] serves every round: it remembers the
    completions of the rounds before (a cache: a resumed run starts it empty).

    Args:
        trainer: The GRPO trainer it generates for (its model, accelerator, state and sampling settings).
        head: The draft head, or None for plain sampling.
    """

    def __init__(self, trainer: Any, head: MTPHead | None):
        super().__init__()
        self._trainer = trainer
        self._head = head
        self._eval_rounds = 0
        self._draft_length: AdaptiveDraftLength | None = None
        self._rollout_drafter = RolloutDrafter() if trainer.args.rollout_drafts else None

    def generate(self, prompt_ids: list[list[int]], *, train: bool, **trl_inputs: Any) -> RolloutResult:
        reject_images(trl_inputs)
        started = time.perf_counter()
        if train:
            round_index, self._rounds = self._rounds, self._rounds + 1
        else:
            round_index, self._eval_rounds = -1 - self._eval_rounds, self._eval_rounds + 1
        with current_policy(self._trainer) as policy:
            if self._trainer.args.adaptive_draft_length and self._head is not None and self._draft_length is None:
                self._draft_length = calibrate_draft_length(
                    policy,
                    self._head,
                    *padded_prompts(policy, self._trainer._tokenizer, prompt_ids),
                    max_draft_tokens=self._trainer.args.num_speculative_tokens,
                    temperature=self._trainer.temperature,
                )
            output, staleness = self._generate_round(policy, prompt_ids, round_index, train)
        return _result(output, time.perf_counter() - started, staleness, train)

    def _generate_round(
        self, policy: nn.Module, prompt_ids: list[list[int]], round_index: int, train: bool
    ) -> tuple[GenerationOutput, int | None]:
        return self._generate_now(policy, prompt_ids, round_index), None

    def _generate_now(self, policy: nn.Module, prompt_ids: list[list[int]], round_index: int) -> GenerationOutput:
        return generate_from_ids(
            policy,
            self._trainer._tokenizer,
            prompt_ids,
            head=self._head,
            generator=self._round_generator(round_index),
            **self._engine_kwargs(),
            **self._sampling_kwargs(),
        )

    def _engine_kwargs(self) -> dict[str, Any]:
        args = self._trainer.args
        return dict(
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sampling=args.draft_sampling,
            draft_length=self._draft_length,
            rejection_sample_method=args.rejection_sample_method,
            rollout_drafter=self._rollout_drafter,
        )

    def _sampling_kwargs(self) -> dict[str, Any]:
        trainer = self._trainer
        return dict(
            max_new_tokens=trainer.max_completion_length,
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            top_k=trainer.top_k or 0,
            eos_token_id=list(trainer.eos_token_ids),
            max_batch_size=trainer.args.rollout_max_batch_size,
        )

    def _round_generator(self, round_index: int) -> torch.Generator:
        trainer = self._trainer
        seed = (trainer.args.seed * 1_000_003 + trainer.accelerator.process_index * 10_007 + round_index) % (2**63)
        return torch.Generator(device=trainer.accelerator.device).manual_seed(seed)


class BackgroundEngineRollout(EngineRollout):
    """The torch engine generating the next training round in a background thread while the trainer trains.

    The worker holds a snapshot of the policy (and head) taken when the round was submitted. A round it finished
    is used if the trainer has moved on by at most `max_staleness` optimizer steps since the snapshot; otherwise
    the round is generated now. Either way the next generation batch, read ahead from the trainer's epoch
    iterator, is submitted at once. Evaluation rounds are generated now.
    """

    def __init__(self, trainer: Any, head: MTPHead | None):
        check_unsharded(trainer)
        super().__init__(trainer, head)
        args = trainer.args
        # Remember enough batches to find the current generation batch after gradient accumulation prefetch.
        self._generate_every = args.steps_per_generation * args.num_iterations
        self._lookahead = Lookahead(history=self._generate_every + args.gradient_accumulation_steps + 1)
        self._generation_batch: Any = None
        self._worker: AsyncRolloutWorker | None = None

    def watch_epoch(self, epoch_iterator: Iterator) -> Iterator:
        return self._lookahead.wrap(epoch_iterator)

    def start_round(self, inputs: Any) -> None:
        self._generation_batch = inputs

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _generate_round(
        self, policy: nn.Module, prompt_ids: list[list[int]], round_index: int, train: bool
    ) -> tuple[GenerationOutput, int | None]:
        if not train:
            return super()._generate_round(policy, prompt_ids, round_index, train)
        if self._worker is None:
            self._worker = AsyncRolloutWorker(policy, self._head, self._trainer._tokenizer, **self._engine_kwargs())
        step = self._trainer.state.global_step
        rollout = self._worker.take(prompt_ids)
        if rollout is not None and step - rollout.version <= self._trainer.args.max_staleness:
            output, staleness = rollout.output, step - rollout.version
        else:
            output, staleness = self._generate_now(policy, prompt_ids, round_index), 0
        self._submit_next_round(policy, round_index + 1)
        return output, staleness

    def _submit_next_round(self, policy: nn.Module, round_index: int) -> None:
        """Starts generating the next generation batch in the background, if the epoch iterator can show it."""
        if self._generation_batch is None:
            return
        upcoming = self._lookahead.peek_after(self._generation_batch, self._generate_every)
        if upcoming is None:
            return
        prompt_ids, _, _ = self._trainer._tokenize_prompts([example["prompt"] for example in upcoming])
        self._worker.submit(
            prompt_ids,
            policy,
            self._head,
            version=self._trainer.state.global_step,
            generator=self._round_generator(round_index),
            **self._sampling_kwargs(),
        )


def _result(output: GenerationOutput, seconds: float, staleness: int | None, train: bool) -> RolloutResult:
    """A round of the engine as a rollout result; a training round with drafts adds one fit point per completion:
    (its mean entropy, its acceptance rate), weighted by its drafted tokens."""
    stats = output.stats
    fit_points = None
    if stats.num_speculative_tokens and train:
        fit_points = (
            stats.mean_entropy_per_row.double(),
            stats.row_acceptance_rate,
            stats.draft_tokens_per_row.double(),
        )
    return RolloutResult(
        completion_ids=output.unpadded(output.completion_ids),
        logprobs=output.unpadded(output.logprobs),
        counts=stats.counts,
        num_speculative_tokens=stats.num_speculative_tokens,
        seconds=seconds,
        staleness=staleness,
        fit_points=fit_points,
    )


def check_unsharded(trainer: Any) -> None:
    """Raises if the trainer shards the policy's weights (DeepSpeed ZeRO-3, FSDP): the background worker snapshots
    the whole policy from this process's copy, which then holds a shard."""
    zero_stage = None
    if getattr(trainer, "is_deepspeed_enabled", False):
        zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    if zero_stage == 3 or getattr(trainer, "is_fsdp_enabled", False):
        sharding = "DeepSpeed ZeRO-3" if zero_stage == 3 else "FSDP"
        raise ValueError(
            f"async_rollouts snapshots the whole policy on every process, which {sharding} shards. Use DDP or "
            "DeepSpeed ZeRO-1/2, or async_rollouts=False, or BebopAsyncGRPOTrainer (a vLLM server generates)."
        )
