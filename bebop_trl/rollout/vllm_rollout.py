"""Rollout backends on vLLM: TRL's vLLM generation with the MTP head or rollout drafts as vLLM's drafter, colocated
or on a server."""

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ..modeling import MTPHead
from ..modeling.vllm_export import draft_speculative_config, vllm_draft_weights
from ..speculative import AcceptanceCounts
from ..speculative.engine import eval_mode
from ..speculative.exactness import completion_logprobs
from .base import RolloutBackend, RolloutResult, current_policy
from .vllm_backend import (
    counts_from_llm_metrics,
    load_colocated_draft_weights,
    push_draft_weights_to_server,
    read_server_counters,
)
from .vllm_exactness import VLLMExactness, guard_vllm_exactness


# TRL's `_generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)`, bound.
TRLGenerate = Callable[..., tuple[list[list[int]], list[list[float]] | None]]
DRAFT_DIR = "vllm_draft"


class VLLMRollout(RolloutBackend):
    """TRL's vLLM generation, with the head or rollout drafts drafting in vLLM; acceptance read from vLLM's counters.

    vLLM counts acceptance cumulatively and per engine, not per sequence: a round's counts are the difference of
    two readings, and the round is one point of the acceptance-entropy fit. After the trainer changes the head, the
    next round first loads its weights into vLLM's drafter. On a vLLM build whose sampling log-probs are not exact
    (see [`guard_vllm_exactness`][bebop_trl.rollout.vllm_exactness.guard_vllm_exactness]), the log-probs are
    recomputed with the policy, which holds the weights vLLM sampled with.

    Args:
        trainer: The GRPO trainer it generates for.
        head: The draft head (the master weights of online updates), or None where vLLM drafts without a model
            (rollout drafts).
        trl_generate: TRL's own `_generate_single_turn`, bound to the trainer.
        exactness: The exactness guard's verdict on this vLLM, or None when the server guards itself.
    """

    def __init__(self, trainer: Any, head: MTPHead | None, trl_generate: TRLGenerate, exactness: VLLMExactness | None):
        super().__init__()
        self._trainer = trainer
        self._head = head
        self._trl_generate = trl_generate
        self._exactness = exactness
        self._counters = AcceptanceCounts()
        # Whether vLLM's drafter still runs older head weights than `head` (after online updates or a resume).
        self._draft_stale = False

    def head_updated(self) -> None:
        self._draft_stale = True

    def generate(self, prompt_ids: list[list[int]], *, train: bool, **trl_inputs: Any) -> RolloutResult:
        if self._draft_stale:
            self.push_head()
        started = time.perf_counter()
        completion_ids, logprobs = self._trl_generate(prompt_ids, **trl_inputs)
        if logprobs is not None and self._exactness is not None and self._exactness.logprobs_ok is False:
            logprobs = self._policy_logprobs(prompt_ids, completion_ids)
        seconds = time.perf_counter() - started
        if train:
            self._rounds += 1
        counters = self.read_counters()
        counts, self._counters = counters - self._counters, counters
        fit_points = None
        if train and logprobs is not None and counts.num_drafts:
            # The mean negative log-prob of the sampled tokens is an unbiased estimate of the policy's mean entropy.
            sampled = [lp for seq in logprobs for lp in seq]
            fit_points = (
                torch.tensor([-sum(sampled) / max(len(sampled), 1)], dtype=torch.float64),
                torch.tensor([counts.acceptance_rate], dtype=torch.float64),
                torch.tensor([float(counts.num_draft_tokens)], dtype=torch.float64),
            )
        k = self._trainer.args.num_speculative_tokens
        return RolloutResult(completion_ids, logprobs, counts, k, seconds, fit_points=fit_points)

    def read_counters(self) -> AcceptanceCounts:
        """vLLM's cumulative spec-decode counters as this process sees them."""
        raise NotImplementedError

    def push_head(self) -> None:
        """Loads the head's current weights into vLLM's drafter."""
        raise NotImplementedError

    def _policy_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The sampling log-probs of vLLM's completions, recomputed with the policy (for a build whose own are
        wrong): vLLM's copy of the policy holds the same weights, so these are the log-probs it sampled from."""
        trainer = self._trainer
        with current_policy(trainer) as policy, eval_mode(policy):
            return completion_logprobs(
                policy,
                prompt_ids,
                completion_ids,
                temperature=trainer.temperature,
                top_k=trainer.top_k or 0,
                top_p=trainer.top_p,
                batch_size=trainer.args.per_device_train_batch_size,
            )


class VLLMColocateRollout(VLLMRollout):
    """vLLM in the trainer's process (`vllm_mode="colocate"`)."""

    def read_counters(self) -> AcceptanceCounts:
        return counts_from_llm_metrics(self._trainer.vllm_generation.llm.get_metrics())

    @torch.no_grad()
    def push_head(self) -> None:
        load_colocated_draft_weights(self._trainer.vllm_generation.llm, vllm_draft_weights(self._head))
        self._draft_stale = False


class VLLMServerRollout(VLLMRollout):
    """A `bebop-trl vllm-serve` server (`vllm_mode="server"`). Only the main process talks to the server: it
    reads the counters (the other processes report none, and the gather sums) and streams the head's weights."""

    def read_counters(self) -> AcceptanceCounts:
        trainer = self._trainer
        if not trainer.accelerator.is_main_process:
            return AcceptanceCounts()
        generation = trainer.vllm_generation
        base_url = generation.server_base_url or f"http://{generation.server_host}:{generation.server_port}"
        return read_server_counters(base_url)

    @torch.no_grad()
    def push_head(self) -> None:
        trainer = self._trainer
        if trainer.accelerator.is_main_process:  # TRL's client lives on the main process only
            push_draft_weights_to_server(trainer.vllm_generation.vllm_client, vllm_draft_weights(self._head))
        self._draft_stale = False


def vllm_rollout(
    trainer: Any, head: MTPHead | None, trl_generate: TRLGenerate, exactness: VLLMExactness | None
) -> VLLMRollout:
    """The vLLM backend of the trainer's `vllm_mode` (`head=None`: vLLM drafts without a model)."""
    backend = VLLMColocateRollout if trainer.vllm_generation.mode == "colocate" else VLLMServerRollout
    return backend(trainer, head, trl_generate, exactness)


def guard_colocated_vllm(args: Any) -> VLLMExactness | None:
    """The exactness guard of colocated vLLM rollouts (in server mode the engine is the server's, which
    `bebop-trl vllm-serve` guards). Every process applies the fixes of its own engine; the local main process runs
    the self-test first, so the others read its cached result."""
    from accelerate import PartialState

    if args.vllm_mode != "colocate":
        return None
    with PartialState().local_main_process_first():
        return guard_vllm_exactness(
            apply_shims=args.vllm_compat_shims, self_test=args.vllm_self_test, allow_inexact=args.vllm_allow_inexact
        )


def export_draft_for_vllm(policy: Any, args: Any, head: MTPHead | None) -> dict[str, Any]:
    """Writes the head as vLLM's draft checkpoint under `output_dir/vllm_draft` (once per machine) and returns the
    speculative config of vLLM's engine. A native Qwen3.5 / Qwen3-Next head is the policy checkpoint itself.

    Args:
        policy: The policy, or its Hub id or folder.
        args: The trainer's `BebopGRPOConfig` (`output_dir`, `num_speculative_tokens`, `draft_sampling`,
            `rejection_sample_method`).
        head: The head to draft with, or None for the policy checkpoint's native MTP weights (`mtp_head="native"`).
    """
    from accelerate import PartialState

    state = PartialState()
    with state.local_main_process_first():
        return draft_speculative_config(
            head,
            policy if isinstance(policy, str) else policy.config.name_or_path,
            os.path.join(args.output_dir, DRAFT_DIR),
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sampling=args.draft_sampling,
            rejection_sample_method=args.rejection_sample_method,
            target_config=None if isinstance(policy, str) else policy.config,
            write=state.is_local_main_process,
        )
