"""Choosing the draft length per cycle from the head's own confidence and the measured step costs.

A cycle that drafts j tokens costs `j * draft + verify(j + 1)` decode steps and emits `1 + E_j` tokens on average,
with `E_j = sum_{i <= j} prod_{l <= i} a_l` and `a_l` the probability that draft l is accepted once the earlier ones
were. Drafting one more token raises tokens per unit cost exactly when its expected gain `prod_{l <= j + 1} a_l`,
divided by its extra cost `draft + verify(j + 2) - verify(j + 1)`, beats the cycle's current rate
`(1 + E_j) / cost_j`.

The acceptance of a draft is predicted from the draft side only: the head's top probability for it, mapped to an
acceptance rate by a calibration table that the policy keeps from the drafts verified so far. Since the decision
reads nothing of the policy's distribution at the drafted positions, every emitted token is still verified by exact
rejection sampling, and the output keeps the policy's law whatever the draft length.

Costs measured once can be wrong: a timing on a loaded machine, or costs that change with the batch size and the
cache length. So the policy also times every cycle it runs, and once it has timed cycles of every length at a batch
size, it decides there with those measured cycle costs instead of the calibrated ones. And it does not trust its own
rule blindly: it also drafts some cycles at each fixed length 1..k, estimates the tokens per second of each fixed
length from the measured cycle times and acceptance per position, and drafts most cycles with whichever of the rule
and the fixed lengths is fastest (a few cycles keep checking the others), so that it ends up no slower than the best
fixed draft length, k = 1 included, up to what the checks cost.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modeling import MTPHead
from .step_costs import time_cycle_steps


# The most drafts per cycle of `num_speculative_tokens="auto"`: past 4, acceptance of the deepest drafts is rarely
# worth a wider verify pass.
AUTO_MAX_DRAFT_TOKENS = 4


@dataclass(frozen=True)
class StepCosts:
    """Costs of the steps of a cycle, in units of one 1-token decode step of the policy.

    Attributes:
        draft: One head step (forward, lm_head and sampling).
        verify: `verify[n - 1]` is a policy pass over n new tokens, for n = 1..k_max + 1 (`verify[0]` is 1 by
            definition of the unit).
    """

    draft: float
    verify: tuple[float, ...]

    def __post_init__(self):
        if self.draft < 0 or not self.verify or any(c <= 0 for c in self.verify):
            raise ValueError(
                f"Step costs must be positive (draft >= 0), got draft={self.draft}, verify={self.verify}."
            )

    @property
    def max_draft_tokens(self) -> int:
        return len(self.verify) - 1

    @classmethod
    def from_seconds(cls, seconds: dict[str, float]) -> "StepCosts":
        """From the median seconds of [`time_cycle_steps`][bebop_trl.speculative.step_costs.time_cycle_steps]
        (`decode`, `draft`, `verify_1`, `verify_2`, ...)."""
        decode = seconds["decode"]
        verify = [1.0]
        while f"verify_{len(verify) + 1}" in seconds:
            verify.append(seconds[f"verify_{len(verify) + 1}"] / decode)
        return cls(draft=seconds["draft"] / decode, verify=tuple(verify))

    def cycle(self, num_drafts: int) -> float:
        """Cost of a cycle that drafts `num_drafts` tokens."""
        return num_drafts * self.draft + self.verify[num_drafts]


# Cycles of the rule, and of each fixed draft length, timed at a batch size before the policy chooses there by
# measured rates rather than in turn.
_WARMUP_CYCLES = 6
# Timed cycles of a draft length at a batch size before its measured cost replaces the calibrated one in the rule.
_MEASURED_CYCLES = 3
# The rule's rate is measured from its own cycles, a noisier estimate than the fixed lengths' pooled ones, and the
# larger of noisy estimates is biased up: the rule drafts only where it beats the best fixed length by this factor.
_RULE_MARGIN = 1.03


@dataclass
class _Decayed:
    """A decayed sum and weight (`value / weight` is the recent mean) and the raw count of what was added."""

    value: float = 0.0
    weight: float = 0.0
    count: int = 0

    def add(self, value: float, weight: float, decay: float) -> None:
        self.value = decay * self.value + value
        self.weight = decay * self.weight + weight
        self.count += 1

    @property
    def mean(self) -> float:
        return self.value / self.weight


class AdaptiveDraftLength:
    """Decides after each draft step whether one more draft is worth its cost; learns acceptance and costs.

    The engine calls [`begin_cycle`][bebop_trl.speculative.draft_length.AdaptiveDraftLength.begin_cycle] before a
    cycle drafts, [`keep_drafting`][bebop_trl.speculative.draft_length.AdaptiveDraftLength.keep_drafting] after each
    draft step, [`update`][bebop_trl.speculative.draft_length.AdaptiveDraftLength.update] with the verified cycle
    and [`end_cycle`][bebop_trl.speculative.draft_length.AdaptiveDraftLength.end_cycle] with its tokens and time.

    With `fallback`, each cycle is drafted by one of several *arms*: the confidence rule, or a fixed length 1..k.
    A fixed length's tokens per second are estimated from pooled measurements, which are far less noisy than its own
    cycles' yield: the measured time of cycles of that length at the batch size, and the acceptance per position of
    every fixed-length cycle (a fixed length does not depend on the head's confidence, so these cycles measure the
    acceptance without the rule's selection). The rule's rate is its own cycles' tokens over their time, noisier, so
    the rule is preferred only where it beats the best fixed length by 3%. Most cycles go to the fastest arm; the
    share `exploration` goes to the others in turn, which keeps every estimate fresh.

    Args:
        costs: The step costs (from a calibration, or given), in units of a decode step.
        num_bins: Bins of the head's top probability in the calibration table.
        prior_weight: Pseudo-counts of the prior in each bin (the prior predicts the top probability itself, what
            a calibrated greedy drafter would get).
        fallback: Also draft with every fixed length 1..k, and draft most cycles with whichever of the confidence
            rule and the fixed lengths is measured fastest (see above). False always applies the rule.
        exploration: With `fallback`, the share of cycles that keep checking the arms that are not the fastest.
        memory: Measured times, yields and acceptances decay by this factor at each cycle that measures them (a
            cycle of that length, of the rule, or one that drafts that deep), so that they follow changes (the
            policy's entropy, the cache length) over the last `1 / (1 - memory)` such cycles or so.

    Example:
        ```python
        policy = AdaptiveDraftLength(StepCosts(draft=0.08, verify=(1.0, 1.1, 1.15, 1.2, 1.3)))
        engine = SpeculativeGenerator(model, head, num_speculative_tokens=4, draft_length=policy)
        ```
    """

    def __init__(
        self,
        costs: StepCosts,
        num_bins: int = 10,
        prior_weight: float = 4.0,
        *,
        fallback: bool = True,
        exploration: float = 0.1,
        memory: float = 0.98,
    ):
        if num_bins < 1 or prior_weight <= 0:
            raise ValueError(f"num_bins must be >= 1 and prior_weight > 0, got {num_bins} and {prior_weight}.")
        if not 0 < exploration < 1 or not 0 < memory < 1:
            raise ValueError(f"exploration and memory must be in (0, 1), got {exploration} and {memory}.")
        self.costs = costs
        self.num_bins = num_bins
        centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins
        self.accepted = centres * prior_weight
        self.verified = torch.full((num_bins,), prior_weight, dtype=torch.float64)
        # Arms: the rule (None) first, then each fixed length.
        self.arms: list[int | None] = [None, *range(1, costs.max_draft_tokens + 1)] if fallback else [None]
        self.exploration, self.memory = exploration, memory
        self._cycles = 0
        self._arm = 0
        self._batch_size: int | None = None
        # (batch size, draft length) -> seconds per cycle; batch size -> the rule's tokens per second.
        self._timed: dict[tuple[int, int], _Decayed] = {}
        self._rule_rate: dict[int, _Decayed] = {}
        # Per draft position j: rows of fixed-length cycles that drafted >= j tokens, and those that accepted >= j.
        self._reached = torch.zeros(costs.max_draft_tokens, dtype=torch.float64)
        self._passed = torch.zeros(costs.max_draft_tokens, dtype=torch.float64)

    @property
    def max_draft_tokens(self) -> int:
        return self.costs.max_draft_tokens

    @property
    def arm(self) -> int | None:
        """The fixed draft length of the current cycle, or None where the confidence rule decides."""
        return self.arms[self._arm]

    def rates(self, batch_size: int | None = None) -> dict[str, float]:
        """Estimated tokens per second of each arm (`"rule"`, `"k=1"`, ...) at `batch_size` (default: the current
        cycle's), for the arms measured there."""
        batch_size = self._batch_size if batch_size is None else batch_size
        rates = {}
        for arm in self.arms:
            rate = self._rate(arm, batch_size)
            if rate is not None:
                rates["rule" if arm is None else f"k={arm}"] = rate
        return rates

    def _rate(self, arm: int | None, batch_size: int) -> float | None:
        if arm is None:
            rule = self._rule_rate.get(batch_size)
            return rule.mean if rule is not None and rule.weight > 0 else None
        timed = self._timed.get((batch_size, arm))
        if timed is None:
            return None
        # P(the first j drafts all accepted), from the fixed-length cycles that drafted >= j.
        survival = self._passed[:arm] / self._reached[:arm].clamp(min=1e-12)
        return batch_size * (1.0 + survival.sum().item()) / timed.mean

    def _measured(self, batch_size: int) -> bool:
        """Whether every arm has been timed often enough at `batch_size` to be chosen by its rate."""
        rule = self._rule_rate.get(batch_size)
        if rule is None or rule.count < _WARMUP_CYCLES or self._reached[-1] == 0:
            return False
        return all(
            (timed := self._timed.get((batch_size, arm))) is not None and timed.count >= _MEASURED_CYCLES
            for arm in self.arms[1:]
        )

    def begin_cycle(self, batch_size: int) -> None:
        """Chooses how the next cycle, of `batch_size` rows, is drafted: by the rule or at a fixed length.

        Where the arms are not all measured at this batch size, the nearest measured batch size stands for it; where
        none is, the arms take turns."""
        self._batch_size = batch_size
        self._cycles += 1
        count = len(self.arms)
        if count == 1:
            return
        measured = [b for b in {b for b, _ in self._timed} if self._measured(b)]
        if not measured:
            self._arm = self._cycles % count
            return
        reference = min(measured, key=lambda b: (abs(b - batch_size), -b))
        rates = [self._rate(arm, reference) for arm in self.arms]
        best = max(range(1, count), key=rates.__getitem__)
        if rates[0] > _RULE_MARGIN * rates[best]:
            best = 0
        period = round(1 / self.exploration)
        if self._cycles % period:
            self._arm = best
        else:  # a check of the other arms, in turn
            others = [arm for arm in range(count) if arm != best]
            self._arm = others[(self._cycles // period) % len(others)]

    def end_cycle(self, num_drafts: int, tokens: int, seconds: float) -> None:
        """Records the cycle begun last: it drafted `num_drafts` per row and emitted `tokens` in `seconds`."""
        decay = self.memory
        self._timed.setdefault((self._batch_size, num_drafts), _Decayed()).add(seconds, 1.0, decay)
        if self.arm is None:
            self._rule_rate.setdefault(self._batch_size, _Decayed()).add(tokens, seconds, decay)

    def cycle_cost(self, num_drafts: int) -> float:
        """Cost of a cycle of `num_drafts` drafts at the current batch size, in the units the rule compares: timed
        seconds once every length has been timed there often enough, else the calibrated decode steps."""
        timed = [self._timed.get((self._batch_size, j)) for j in range(1, self.max_draft_tokens + 1)]
        if all(t is not None and t.count >= _MEASURED_CYCLES for t in timed):
            return timed[num_drafts - 1].mean
        return self.costs.cycle(num_drafts)

    def _bin(self, confidence: torch.Tensor) -> torch.Tensor:
        return (confidence.double().clamp(0, 1) * self.num_bins).long().clamp(max=self.num_bins - 1).cpu()

    def predicted_acceptance(self, confidence: torch.Tensor) -> torch.Tensor:
        """[B] predicted probability that drafts of top probability `confidence` [B] are accepted."""
        bins = self._bin(confidence)
        return (self.accepted[bins] / self.verified[bins]).to(confidence.device)

    def keep_drafting(self, confidences: Sequence[torch.Tensor]) -> bool:
        """Whether to draft one more token after the drafts whose top probabilities are `confidences`.

        Args:
            confidences: One [B] tensor per draft of this cycle so far (the batch drafts together, so the decision
                is taken on the batch mean of the expected gains).
        """
        drafted = len(confidences)
        if drafted >= self.max_draft_tokens:
            return False
        if self.arm is not None:
            return drafted < self.arm
        survival = torch.ones_like(confidences[0], dtype=torch.float64)
        expected_accepted = torch.zeros_like(survival)
        for confidence in confidences:
            survival = survival * self.predicted_acceptance(confidence)
            expected_accepted = expected_accepted + survival
        # The next draft's acceptance is not known before it is drafted: the last one's stands for it.
        gain = (survival * self.predicted_acceptance(confidences[-1])).mean().item()
        cost = self.cycle_cost(drafted)
        rate = (1.0 + expected_accepted.mean().item()) / cost
        return gain > rate * (self.cycle_cost(drafted + 1) - cost)

    def update(self, confidences: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Records a verified cycle: draft j was verified if the ones before it were accepted.

        Args:
            confidences: [B, j] top probabilities of the cycle's drafts.
            num_accepted: [B] drafts accepted per row.
        """
        drafted = confidences.shape[1]
        if self.arm is not None and drafted:
            decay = self.memory
            rows = float(len(num_accepted))
            passed = (num_accepted.unsqueeze(-1) >= torch.arange(1, drafted + 1, device=num_accepted.device)).sum(0)
            # Each position decays at the cycles that measure it only: the deep ones, drafted by a few cycles,
            # keep as many samples as the shallow ones.
            self._reached[:drafted] = decay * self._reached[:drafted] + rows
            self._passed[:drafted] = decay * self._passed[:drafted] + passed.double().cpu()
        positions = torch.arange(drafted, device=confidences.device)
        verified = positions <= num_accepted.unsqueeze(-1)
        accepted = positions < num_accepted.unsqueeze(-1)
        bins = self._bin(confidences[verified])
        self.verified.index_add_(0, bins, torch.ones(len(bins), dtype=torch.float64))
        self.accepted.index_add_(0, bins, accepted[verified].double().cpu())


def calibrate_draft_length(
    policy: torch.nn.Module,
    head: MTPHead,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    *,
    max_draft_tokens: int,
    temperature: float,
    repeats: int = 5,
) -> AdaptiveDraftLength:
    """An [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength] with step costs measured
    on this batch: a decode step, a draft step and verify passes over 2..max_draft_tokens + 1 tokens.

    Args:
        policy: The policy.
        head: The draft head.
        input_ids: [B, P] left-padded prompts of the batch to calibrate on.
        attention_mask: [B, P] their mask.
        max_draft_tokens: The most drafts per cycle.
        temperature: Sampling temperature (the steps sample as the engine does).
        repeats: Timed rounds of each step (after one warm-up round).
    """
    seconds = time_cycle_steps(
        policy,
        head,
        input_ids,
        attention_mask,
        verify_lengths=range(2, max_draft_tokens + 2),
        temperature=temperature if temperature > 0 else 1.0,
        repeats=repeats,
    )
    return AdaptiveDraftLength(StepCosts.from_seconds(seconds))
