"""Acceptance statistics of a speculative generation run."""

from dataclasses import dataclass

import torch

from .counts import AcceptanceCounts


@dataclass
class AcceptanceStats:
    """How many drafted tokens the policy accepted, and how uncertain the policy was.

    A draft is one cycle of one row: the head proposes up to `num_speculative_tokens` tokens (exactly that many
    unless the draft length is chosen per cycle) and the policy verifies them in one forward pass. Counts cover the
    rows still generating at the start of each cycle.

    Attributes:
        num_speculative_tokens: Most tokens drafted per cycle (k; 0 without a head).
        num_drafts: Draft cycles, summed over rows.
        num_draft_tokens: Drafted tokens (`num_drafts * k` with a fixed draft length).
        num_accepted_tokens: Drafted tokens the policy accepted.
        accepted_per_position: [k] how often the j-th drafted token of a cycle was accepted.
        drafted_per_position: [k] how often a cycle drafted a j-th token (`num_drafts` at every position with a
            fixed draft length).
        drafts_per_row: [B] draft cycles of each row.
        draft_tokens_per_row: [B] drafted tokens of each row.
        accepted_per_row: [B] accepted drafted tokens of each row.
        entropy: [B, L] entropy (nats) of the processed policy distribution at every emitted token, 0 after the end
            of each row.
        mean_entropy: Mean of `entropy` over the emitted tokens.
        mean_entropy_per_row: [B] mean of `entropy` over each row's emitted tokens.
        num_rollout_drafts: The draft cycles drafted from other rollouts of the row's prompt (included in
            `num_drafts`; see [`RolloutDrafter`][bebop_trl.speculative.rollout_drafts.RolloutDrafter]).
        num_rollout_draft_tokens: Their drafted tokens.
        num_rollout_accepted_tokens: Their accepted tokens.
    """

    num_speculative_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: torch.Tensor
    drafted_per_position: torch.Tensor
    drafts_per_row: torch.Tensor
    draft_tokens_per_row: torch.Tensor
    accepted_per_row: torch.Tensor
    entropy: torch.Tensor
    mean_entropy: float
    mean_entropy_per_row: torch.Tensor
    num_rollout_drafts: int = 0
    num_rollout_draft_tokens: int = 0
    num_rollout_accepted_tokens: int = 0

    @property
    def counts(self) -> AcceptanceCounts:
        """The run's draft and acceptance counts, as every rollout backend reports them."""
        return AcceptanceCounts(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.accepted_per_position.tolist(),
            self.num_rollout_drafts,
            self.num_rollout_draft_tokens,
            self.num_rollout_accepted_tokens,
        )

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 without drafts)."""
        return self.counts.acceptance_rate

    @property
    def acceptance_per_position(self) -> torch.Tensor:
        """[k] fraction of cycles whose j-th draft was accepted (the j-th draft is only verified if the earlier ones
        passed, so this is the probability that the first j + 1 drafts all pass)."""
        return self.accepted_per_position.double() / max(self.num_drafts, 1)

    @property
    def row_acceptance_rate(self) -> torch.Tensor:
        """[B] accepted / drafted tokens of each row (NaN for a row that never drafted, e.g. one that ended at its
        first token)."""
        drafted = self.draft_tokens_per_row.double()
        return self.accepted_per_row.double() / drafted.where(drafted > 0, torch.nan)

    @property
    def mean_draft_length(self) -> float:
        """Drafted tokens per cycle (k with a fixed draft length; 0 without drafts)."""
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def accepted_drafts_per_cycle(self) -> float:
        """Accepted drafts per cycle; a cycle emits this plus one token (0 without drafts)."""
        return self.counts.accepted_drafts_per_cycle

    def to_dict(self) -> dict[str, float]:
        """Flat scalar metrics for logging."""
        metrics = {
            "num_drafts": float(self.num_drafts),
            "num_draft_tokens": float(self.num_draft_tokens),
            "num_accepted_tokens": float(self.num_accepted_tokens),
            "acceptance_rate": self.acceptance_rate,
            "accepted_drafts_per_cycle": self.accepted_drafts_per_cycle,
            "mean_draft_length": self.mean_draft_length,
            "mean_entropy": self.mean_entropy,
        }
        if self.num_rollout_drafts:
            metrics["rollout_draft_share"] = self.num_rollout_drafts / self.num_drafts
            metrics["rollout_draft_acceptance_rate"] = self.num_rollout_accepted_tokens / self.num_rollout_draft_tokens
        for j, rate in enumerate(self.acceptance_per_position.tolist()):
            metrics[f"acceptance_position_{j + 1}"] = rate
        return metrics
