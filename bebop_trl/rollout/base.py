"""The rollout interface: one object turns a round's prompt ids into completions, log-probs and acceptance counts."""

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl.models import unwrap_model_for_generation

from ..speculative import AcceptanceCounts


@dataclass
class RolloutResult:
    """One round of rollouts on this process.

    Attributes:
        completion_ids: One token id list per prompt (EOS included, no padding).
        logprobs: The sampling log-prob of every completion token, or None when the backend has none.
        counts: This process's draft and acceptance counts of the round (empty without a head).
        num_speculative_tokens: The most tokens drafted per cycle (0 without a head): the positions to log.
        seconds: Wall time the trainer waited for the round.
        staleness: Optimizer steps between the policy that generated the round and the current one (0: the
            current policy), or None for a backend that always generates with the current policy.
        fit_points: (entropy, acceptance, weight) float64 tensors, one point of the acceptance-entropy fit each, or
            None when the round adds none.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    counts: AcceptanceCounts
    num_speculative_tokens: int
    seconds: float
    staleness: int | None = None
    fit_points: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


class RolloutBackend(abc.ABC):
    """Generates a trainer's rollouts, and owns every piece of state that generating needs.

    [`BebopGRPOTrainer`][bebop_trl.BebopGRPOTrainer] hands each generation round's prompt ids to its backend and
    logs what comes back; the backends are the torch engine (in the foreground or in a background thread) and vLLM
    (colocated or a server). A backend reads the trainer's model, accelerator and sampling settings, so it is made by
    the trainer it serves and lives as long as it.
    """

    def __init__(self) -> None:
        self._rounds = 0  # a backend counts its training rounds as it generates them

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], *, train: bool, **trl_inputs: Any) -> RolloutResult:
        """One round of rollouts for `prompt_ids`.

        Args:
            prompt_ids: The round's prompts, as token id lists.
            train: Whether this is a training round (evaluation rounds draw from their own random stream and do
                not count as rounds).
            **trl_inputs: The rest of TRL's `_generate_single_turn` arguments (`images`, `multimodal_fields`,
                `num_generations`, `has_tool_images`).
        """

    @property
    def rounds(self) -> int:
        """Training rounds generated so far (restored on resume)."""
        return self._rounds

    def watch_epoch(self, epoch_iterator: Iterator) -> Iterator:
        """The trainer's epoch iterator, as the backend needs to see it (a backend that looks ahead wraps it)."""
        return epoch_iterator

    def start_round(self, inputs: Any) -> None:
        """Called with a training round's inputs (the generation batch) before its rollouts are generated."""
        return None  # nothing to do by default

    def head_updated(self) -> None:
        """Called after the trainer changed the draft head's weights (an online update, a resume)."""
        return None  # nothing to do by default

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores to resume generating exactly where the run stopped."""
        return {"rollout_round": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores [`state_dict`][bebop_trl.rollout.RolloutBackend.state_dict]."""
        self._rounds = state["rollout_round"]

    def close(self) -> None:
        """Releases what the backend started (threads); called when training ends."""
        return None  # nothing to do by default


def reject_images(trl_inputs: dict[str, Any]) -> None:
    """Raises for a multimodal batch: the torch engine generates from text-only policies."""
    if trl_inputs.get("images") is not None or trl_inputs.get("multimodal_fields"):
        raise ValueError("Speculative rollouts support text-only policies; this batch has images.")


@contextlib.contextmanager
def current_policy(trainer: Any) -> Iterator[nn.Module]:
    """The trainer's policy with its full current weights (gathered under ZeRO-3 / FSDP), without gradients."""
    with (
        unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as policy,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
    ):
        yield policy
