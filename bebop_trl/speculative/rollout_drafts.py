"""Drafts copied from other rollouts of the same prompt: GRPO samples every prompt many times.

A GRPO round samples G completions per prompt, and prompts come back in later epochs; completions of one prompt
share much of their text (the restated question, the answer's format, the same steps). A
[`RolloutDrafter`][bebop_trl.speculative.rollout_drafts.RolloutDrafter] keeps, per prompt, the completions of earlier
rounds and follows the completions being generated now. For a row whose last n tokens also occur in one of those
sequences (n from `max_match` down to `min_match`, the longest match first), it drafts what most of the matching
sequences wrote next, token by token, with the share of matches that agree as each token's score.

The drafts are deterministic given what was generated before the cycle, so the verifier treats them as a draft
distribution that is one-hot on the drafted token (accepted with probability p(token), as greedy drafts are), and
rejection sampling keeps the output exactly the policy's. Each cycle the engine drafts a row from the source it
predicts to be accepted more: the head (by the top probability of its first draft distribution) or the rollouts (by
the scores), through acceptance tables learnt from the verified drafts of each source.
"""

import threading
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RolloutDraft:
    """What the rollouts propose for one row.

    Attributes:
        tokens: The drafted tokens (at most `max_tokens` of [`propose`][bebop_trl.speculative.rollout_drafts.RolloutDrafter]).
        scores: For each token, the share of the matching sequences still in agreement that continue with it.
    """

    tokens: list[int]
    scores: list[float]


class AcceptanceTable:
    """Predicts the acceptance of a draft from a score in [0, 1], learnt from verified drafts.

    The score's range is cut into bins; each bin predicts its accepted / verified count, starting from a prior that
    predicts the score itself (`prior_weight` pseudo-drafts per bin).

    Args:
        num_bins: Bins of the score.
        prior_weight: Pseudo-counts of the prior in each bin.
    """

    def __init__(self, num_bins: int = 10, prior_weight: float = 4.0):
        if num_bins < 1 or prior_weight <= 0:
            raise ValueError(f"num_bins must be >= 1 and prior_weight > 0, got {num_bins} and {prior_weight}.")
        self.num_bins = num_bins
        centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins
        self.accepted = centres * prior_weight
        self.verified = torch.full((num_bins,), prior_weight, dtype=torch.float64)

    def _bin(self, score: torch.Tensor) -> torch.Tensor:
        return (score.double().clamp(0, 1) * self.num_bins).long().clamp(max=self.num_bins - 1).cpu()

    def predict(self, score: torch.Tensor) -> torch.Tensor:
        """Predicted acceptance [...] of drafts of score `score` [...] (float64, on the score's device)."""
        bins = self._bin(score)
        return (self.accepted[bins] / self.verified[bins]).to(score.device)

    def update(self, score: torch.Tensor, accepted: torch.Tensor) -> None:
        """Records verified drafts: their scores [n] and whether each was accepted [n]."""
        bins = self._bin(score.reshape(-1))
        self.verified.index_add_(0, bins, torch.ones(len(bins), dtype=torch.float64))
        self.accepted.index_add_(0, bins, accepted.reshape(-1).double().cpu())


class RolloutDrafter:
    """Drafts from the other rollouts of a row's prompt, and chooses per cycle between them and the head.

    Give one drafter to every [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator] of a training run
    (`rollout_drafter=`): each `generate` call drafts from the completions of its own rows with the same prompt and
    from the completions it remembers of earlier calls, then remembers its own. Engines in several threads (a
    background rollout worker) may share it.

    Args:
        min_match: Shortest context (in tokens) that must match for a draft.
        max_match: Longest context tried; the longest match wins.
        history_per_prompt: Completions of earlier calls kept per prompt (the newest).
        max_prompts: Prompts whose completions are kept (the most recently seen).
        max_candidates: Matching sequences read per draft (the most recent).
    """

    def __init__(
        self,
        min_match: int = 2,
        max_match: int = 8,
        history_per_prompt: int = 32,
        max_prompts: int = 100_000,
        max_candidates: int = 64,
    ):
        if not 1 <= min_match <= max_match:
            raise ValueError(f"Need 1 <= min_match <= max_match, got min_match={min_match}, max_match={max_match}.")
        if history_per_prompt < 0 or max_prompts < 1 or max_candidates < 1:
            raise ValueError(
                "history_per_prompt must be >= 0 and max_prompts, max_candidates >= 1, got "
                f"{history_per_prompt}, {max_prompts}, {max_candidates}."
            )
        self.min_match, self.max_match = min_match, max_match
        self.history_per_prompt, self.max_prompts, self.max_candidates = (
            history_per_prompt,
            max_prompts,
            max_candidates,
        )
        # prompt -> its latest completions (dicts keep insertion order: the least recently seen prompt is first).
        self._history: dict[tuple[int, ...], deque[tuple[int, ...]]] = {}
        self.rollout_acceptance = AcceptanceTable()
        self.head_acceptance = AcceptanceTable()
        # Accepted / verified head drafts by position: how far a head draft goes once its first token passed.
        self._head_accepted = torch.zeros(0, dtype=torch.float64)
        self._head_verified = torch.zeros(0, dtype=torch.float64)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ history

    def remember(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> None:
        """Keeps completions for later calls, under their prompts."""
        if not self.history_per_prompt:
            return
        with self._lock:
            self._remember(prompts, completions)

    def _remember(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> None:
        for prompt, completion in zip(prompts, completions, strict=True):
            key = tuple(prompt)
            kept = self._history.pop(key, None) or deque(maxlen=self.history_per_prompt)
            kept.append(tuple(completion))
            self._history[key] = kept
        while len(self._history) > self.max_prompts:
            del self._history[next(iter(self._history))]

    def history(self, prompt: Sequence[int]) -> list[tuple[int, ...]]:
        """The remembered completions of `prompt`, oldest first."""
        with self._lock:
            return list(self._history.get(tuple(prompt), ()))

    def session(self, prompts: Sequence[Sequence[int]]) -> "DraftSession":
        """The drafting state of one `generate` call over rows with these prompts."""
        return DraftSession(self, prompts)

    # ------------------------------------------------------------------------------------------------ choosing

    def predicted_head_drafts(self, confidence: torch.Tensor, num_drafts: int) -> torch.Tensor:
        """Expected accepted head drafts [B] of a cycle drafting `num_drafts`, from the top probability of the first
        draft distribution [B] and the head's record at the later positions."""
        with self._lock:
            return self._predicted_head_drafts(confidence, num_drafts)

    def _predicted_head_drafts(self, confidence: torch.Tensor, num_drafts: int) -> torch.Tensor:
        survival = self.head_acceptance.predict(confidence)
        expected = survival.clone()
        for position in range(1, num_drafts):
            survival = survival * self._head_continuation(position)
            expected = expected + survival
        return expected

    def predicted_rollout_drafts(self, scores: torch.Tensor, num_drafts: torch.LongTensor) -> torch.Tensor:
        """Expected accepted rollout drafts [B] from per-token scores [B, j] (rows' first `num_drafts[b]` valid)."""
        with self._lock:
            predicted = self.rollout_acceptance.predict(scores)
        valid = torch.arange(scores.shape[1], device=scores.device) < num_drafts.unsqueeze(-1)
        return (predicted * valid).cumprod(dim=-1).sum(dim=-1)

    def record(
        self,
        is_rollout: torch.BoolTensor,
        head_confidence: torch.Tensor | None,
        rollout_scores: torch.Tensor,
        num_drafted: torch.LongTensor,
        num_accepted: torch.LongTensor,
    ) -> None:
        """Learns from a verified cycle: draft j of a row was verified when the drafts before it were accepted.

        Args:
            is_rollout: [B] which rows drafted from the rollouts (the others from the head).
            head_confidence: [B] top probability of the head's first draft distribution (None without a head).
            rollout_scores: [B, j] the rollout drafts' scores (rows drafting from the head: anything).
            num_drafted: [B] drafts of each row.
            num_accepted: [B] accepted drafts of each row.
        """
        with self._lock:
            self._record(is_rollout, head_confidence, rollout_scores, num_drafted, num_accepted)

    def _record(
        self,
        is_rollout: torch.BoolTensor,
        head_confidence: torch.Tensor | None,
        rollout_scores: torch.Tensor,
        num_drafted: torch.LongTensor,
        num_accepted: torch.LongTensor,
    ) -> None:
        positions = torch.arange(rollout_scores.shape[1], device=num_accepted.device)
        verified = (positions <= num_accepted.unsqueeze(-1)) & (positions < num_drafted.unsqueeze(-1))
        accepted = positions < num_accepted.unsqueeze(-1)
        rows = verified & is_rollout.unsqueeze(-1)
        if rows.any():
            self.rollout_acceptance.update(rollout_scores[rows], accepted[rows])
        head_rows = ~is_rollout & (num_drafted > 0)
        if head_confidence is None or not head_rows.any():
            return
        self.head_acceptance.update(head_confidence[head_rows], num_accepted[head_rows] > 0)
        width = verified.shape[1]
        if len(self._head_verified) < width:
            grown = torch.zeros(width - len(self._head_verified), dtype=torch.float64)
            self._head_verified = torch.cat([self._head_verified, grown])
            self._head_accepted = torch.cat([self._head_accepted, grown])
        self._head_verified[:width] += verified[head_rows].double().sum(dim=0).cpu()
        self._head_accepted[:width] += (verified & accepted)[head_rows].double().sum(dim=0).cpu()

    def _head_continuation(self, position: int) -> float:
        """P(head draft `position` is accepted | it was verified), with a prior of one half over 4 pseudo-drafts."""
        if position < len(self._head_verified):
            return float((self._head_accepted[position] + 2.0) / (self._head_verified[position] + 4.0))
        return 0.5


class DraftSession:
    """The n-gram index of one `generate` call: per prompt, the sequences its rows match against.

    Per prompt, the sequences are the remembered completions of earlier calls and the call's own rows, each as the
    prompt followed by its completion; the rows' sequences grow as they generate.
    """

    def __init__(self, drafter: RolloutDrafter, prompts: Sequence[Sequence[int]]):
        self.drafter = drafter
        self._group_of: list[int] = []
        groups: dict[tuple[int, ...], int] = {}
        self._groups: list[_Group] = []
        for prompt in prompts:
            key = tuple(prompt)
            if key not in groups:
                groups[key] = len(self._groups)
                group = _Group(drafter.min_match, drafter.max_match)
                for completion in drafter.history(prompt):
                    group.add_sequence(list(key) + list(completion))
                self._groups.append(group)
            self._group_of.append(groups[key])
        self.prompts = [list(p) for p in prompts]
        # Per row: its sequence id in its group, set when the row starts.
        self._sequence_of: dict[int, int] = {}

    def start(self, row: int, first_token: int) -> None:
        """Adds row `row` (its prompt and first token) to its prompt's sequences."""
        group = self._groups[self._group_of[row]]
        self._sequence_of[row] = group.add_sequence([*self.prompts[row], first_token])

    def extend(self, row: int, tokens: Sequence[int]) -> None:
        """Appends newly emitted tokens to row `row`'s sequence."""
        if tokens:
            self._groups[self._group_of[row]].extend(self._sequence_of[row], tokens)

    def propose(self, row: int, max_tokens: int) -> RolloutDraft:
        """Up to `max_tokens` tokens that the sequences matching row `row`'s context continue with."""
        group = self._groups[self._group_of[row]]
        return group.propose(self._sequence_of[row], max_tokens, self.drafter.max_candidates)


class _Group:
    """Sequences of one prompt and their n-grams: for n in [min_match, max_match], where each n-gram ends."""

    def __init__(self, min_match: int, max_match: int):
        self.min_match, self.max_match = min_match, max_match
        self.sequences: list[list[int]] = []
        self._ends: dict[int, defaultdict[tuple[int, ...], list[tuple[int, int]]]] = {
            n: defaultdict(list) for n in range(min_match, max_match + 1)
        }

    def add_sequence(self, tokens: list[int]) -> int:
        self.sequences.append([])
        sequence = len(self.sequences) - 1
        self.extend(sequence, tokens)
        return sequence

    def extend(self, sequence: int, tokens: Sequence[int]) -> None:
        seq = self.sequences[sequence]
        start = len(seq)
        seq.extend(tokens)
        for end in range(start, len(seq)):
            for n, ends in self._ends.items():
                if end + 1 >= n:
                    ends[tuple(seq[end + 1 - n : end + 1])].append((sequence, end))

    def propose(self, sequence: int, max_tokens: int, max_candidates: int) -> RolloutDraft:
        seq = self.sequences[sequence]
        last = len(seq) - 1
        for n in range(self.max_match, self.min_match - 1, -1):
            if len(seq) < n:
                continue
            matches = self._ends[n].get(tuple(seq[-n:]))
            if not matches:
                continue
            continuations = [
                self.sequences[s][end + 1 : end + 1 + max_tokens]
                for s, end in matches[-max_candidates - 1 :]
                if not (s == sequence and end == last)
            ]
            draft = _vote([c for c in continuations if c][-max_candidates:], max_tokens)
            if draft.tokens:
                return draft
        return RolloutDraft([], [])


def _vote(continuations: list[list[int]], max_tokens: int) -> RolloutDraft:
    """The continuation most of `continuations` agree on, token by token, with each token's share of agreement."""
    tokens, scores = [], []
    alive = continuations
    for position in range(max_tokens):
        reaching = [c for c in alive if len(c) > position]
        if not reaching:
            break
        counts: dict[int, int] = {}
        for c in reaching:
            counts[c[position]] = counts.get(c[position], 0) + 1
        token, count = max(counts.items(), key=lambda item: item[1])
        tokens.append(token)
        scores.append(count / len(reaching))
        alive = [c for c in reaching if c[position] == token]
    return RolloutDraft(tokens, scores)
