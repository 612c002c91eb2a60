"""Acceptance counts: the one type every rollout backend reports drafting with, summable across rounds and processes."""

from dataclasses import dataclass, field

import torch


@dataclass
class AcceptanceCounts:
    """Draft cycles and accepted drafts of some rollouts.

    The torch engine ([`AcceptanceStats.counts`][bebop_trl.speculative.AcceptanceStats.counts]) and vLLM's spec-decode counters
    report in this type. Counts add and subtract (a round of cumulative counters is the difference of two readings),
    travel as one tensor for gathering across processes, and give their rates and log metrics from one method.

    Attributes:
        num_drafts: Draft cycles, summed over rows.
        num_draft_tokens: Drafted tokens (`num_drafts * k` with a fixed draft length k).
        num_accepted_tokens: Drafted tokens the policy accepted.
        accepted_per_position: How often the j-th drafted token of a cycle was accepted (j = 0, 1, ...).
        num_rollout_drafts: The draft cycles drafted from other rollouts of the prompt rather than by the head
            (included in `num_drafts`; torch engine with a rollout drafter).
        num_rollout_draft_tokens: Their drafted tokens (included in `num_draft_tokens`).
        num_rollout_accepted_tokens: Their accepted tokens (included in `num_accepted_tokens`).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_rollout_drafts: int = 0
    num_rollout_draft_tokens: int = 0
    num_rollout_accepted_tokens: int = 0

    def __add__(self, other: "AcceptanceCounts") -> "AcceptanceCounts":
        return self._combine(other, sign=1)

    def __sub__(self, other: "AcceptanceCounts") -> "AcceptanceCounts":
        return self._combine(other, sign=-1)

    def _combine(self, other: "AcceptanceCounts", sign: int) -> "AcceptanceCounts":
        positions = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine, theirs = self.positions(positions), other.positions(positions)
        return AcceptanceCounts(
            self.num_drafts + sign * other.num_drafts,
            self.num_draft_tokens + sign * other.num_draft_tokens,
            self.num_accepted_tokens + sign * other.num_accepted_tokens,
            [a + sign * b for a, b in zip(mine, theirs, strict=True)],
            self.num_rollout_drafts + sign * other.num_rollout_drafts,
            self.num_rollout_draft_tokens + sign * other.num_rollout_draft_tokens,
            self.num_rollout_accepted_tokens + sign * other.num_rollout_accepted_tokens,
        )

    def positions(self, k: int) -> list[int]:
        """`accepted_per_position` cut or zero-padded to k positions."""
        return (self.accepted_per_position + [0] * k)[:k]

    def as_tensor(self, k: int) -> torch.Tensor:
        """[6 + k] float64: drafts, draft tokens, accepted tokens, the same three of rollout drafts, accepted per
        position (for gathering)."""
        values = [
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.num_rollout_drafts,
            self.num_rollout_draft_tokens,
            self.num_rollout_accepted_tokens,
            *self.positions(k),
        ]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "AcceptanceCounts":
        """The inverse of [`as_tensor`][bebop_trl.speculative.AcceptanceCounts.as_tensor] (e.g. of a sum of
        gathered tensors)."""
        drafts, draft_tokens, accepted, rollout_drafts, rollout_tokens, rollout_accepted, *positions = (
            round(v) for v in values.tolist()
        )
        return cls(drafts, draft_tokens, accepted, positions, rollout_drafts, rollout_tokens, rollout_accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def accepted_drafts_per_cycle(self) -> float:
        """Accepted drafts per cycle (0 without drafts). A cycle emits this plus one token; vLLM reports that sum as
        its mean acceptance length, one more than this."""
        return self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of cycles whose j-th draft was accepted (the j-th draft is only verified if the earlier ones
        passed, so this is the probability that the first j + 1 drafts all pass)."""
        return [count / max(self.num_drafts, 1) for count in self.accepted_per_position]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The log metrics of these counts: drafted tokens, acceptance rate, accepted drafts per cycle, the
        acceptance per position and, with rollout drafts, their share of the cycles and their acceptance rate, each
        name prefixed with `prefix`."""
        metrics = {
            f"{prefix}draft_tokens": float(self.num_draft_tokens),
            f"{prefix}acceptance_rate": self.acceptance_rate,
            f"{prefix}accepted_drafts_per_cycle": self.accepted_drafts_per_cycle,
        }
        for j, rate in enumerate(self.acceptance_per_position):
            metrics[f"{prefix}acceptance_position_{j + 1}"] = rate
        if self.num_rollout_drafts:
            metrics[f"{prefix}rollout_draft_share"] = self.num_rollout_drafts / self.num_drafts
            metrics[f"{prefix}rollout_draft_acceptance_rate"] = (
                self.num_rollout_accepted_tokens / self.num_rollout_draft_tokens
            )
        return metrics
