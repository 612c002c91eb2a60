"""The speculative decoding engine: an MTP head drafts, the policy verifies, rejection sampling keeps it exact.

Batching. The engine decodes up to `max_batch_size` completions at a time (continuous batching): when a row ends,
the next waiting completion takes its place at once, so the batch stays full until the queue runs dry and a row
that drafts well never waits for one that drafts badly. Completions of the same prompt (a GRPO group) share one
prefill of that prompt.

Cache layout. The policy's and the head's KV caches are [`SlotCache`][bebop_trl.speculative.slot_cache.SlotCache]s
with one row per completion: row b holds its sequence from slot 0, so slot s is position s. Policy slot s holds
token x_s; head slot s holds the head's step on the policy's hidden state of slot s and the token after it,
x_{s+1}. A verify pass writes k + 1 slots after each row's length and keeps the row's accepted ones; the next cycle's
head catch-up writes the same kept slots to the head's cache. Rejected slots are dropped, not masked: the next pass
overwrites them.
"""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

from .._compat import attention_implementation, attn_implementation
from ..modeling import MTPHead
from ..modeling.model_inputs import positions_from_mask, with_cache
from ..modeling.vllm_export import DRAFT_SAMPLING_MODES
from .draft_length import AUTO_MAX_DRAFT_TOKENS, AdaptiveDraftLength, calibrate_draft_length
from .rejection import REJECTION_SAMPLE_METHODS, rejection_sample
from .rollout_drafts import DraftSession, RolloutDrafter
from .sampling import probs_from_logits, sample, validate_sampling_params
from .slot_cache import SlotCache, strip_left_padding
from .small_batch_linear import small_batch_linear
from .stats import AcceptanceStats
from .step_costs import synchronize


# Attention implementations that read the engine's 4D masks; the engine runs any other one as "sdpa".
_MASKED_ATTENTION = ("sdpa", "eager")


@dataclass
class GenerationOutput:
    """Completions of one [`generate`][bebop_trl.SpeculativeGenerator.generate] call.

    Attributes:
        completion_ids: [B, L] generated ids (the EOS included), padded with the pad token after each row's end.
        completion_mask: [B, L] long, 1 for generated tokens.
        logprobs: [B, L] float32 log-probabilities of the generated tokens under the processed policy distribution
            (the one they were sampled from), 0 at padding.
        stats: Acceptance statistics and policy entropies.
    """

    completion_ids: torch.LongTensor
    completion_mask: torch.LongTensor
    logprobs: torch.Tensor
    stats: AcceptanceStats

    @property
    def completion_lengths(self) -> torch.LongTensor:
        """[B] number of generated tokens per row."""
        return self.completion_mask.sum(dim=-1)

    def unpadded(self, values: torch.Tensor) -> list[list]:
        """The rows of a [B, L] tensor aligned with the completions (`completion_ids`, `logprobs`) as lists, each
        cut at its completion's end."""
        lengths = self.completion_lengths.tolist()
        return [row[:length] for row, length in zip(values.tolist(), lengths, strict=True)]


@dataclass
class _SamplingParams:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probs_from_logits(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class _Prompt:
    """A prompt prefilled once for all its completions.

    Attributes:
        keys, values: Per policy layer, [heads, P, head_dim] the prompt's KV from slot 0.
        head_keys, head_values: Per head layer, [heads, P - 1, head_dim] the head's KV of the prompt's slots whose
            next token is in the prompt (`None` without a head).
        probs: [V] the processed policy distribution of the first completion token.
        last_feature: [H] the head's input from the policy at the prompt's last slot (`None` without a head).
        waiting: Completions of this prompt not yet admitted.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    head_keys: list[torch.Tensor] | None
    head_values: list[torch.Tensor] | None
    probs: torch.Tensor
    last_feature: torch.Tensor | None
    waiting: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class _Batch:
    """The rows being decoded.

    Attributes:
        requests: [B] the completion (row of the caller's batch) each row generates.
        policy_cache: The policy's cache: every slot before `next_token`.
        head_cache: The head's cache (`None` without a head); it lacks the pending slots until the next catch-up.
        next_token: [B] the last emitted token, not yet in the policy cache (its position is the row's length).
        pending_hidden: [B, m, H] the head's input from the policy at the row's last `pending_count` policy slots,
            still to be fed to the head.
        pending_ids: [B, m] the token after each of those slots.
        pending_count: [B] how many of the m pending slots are the row's.
    """

    requests: torch.LongTensor
    policy_cache: SlotCache
    head_cache: SlotCache | None
    next_token: torch.LongTensor
    pending_hidden: torch.Tensor | None = None
    pending_ids: torch.LongTensor | None = None
    pending_count: torch.LongTensor | None = None

    def select(self, keep: torch.LongTensor) -> None:
        """Keeps only the rows at indices `keep`."""
        for cache in (self.policy_cache, self.head_cache):
            if cache is not None:
                cache.select(keep)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[keep])

    def advance(
        self, tokens: torch.LongTensor, num_accepted: torch.LongTensor, hidden_states: torch.Tensor | None
    ) -> None:
        """Moves past a verified cycle: keeps each row's verified slots up to its first rejection.

        Args:
            tokens: [B, j + 1] output of `rejection_sample`.
            num_accepted: [B] accepted drafts per row.
            hidden_states: [B, j + 1, H] the head's input from the policy at the verified slots (with a head).
        """
        kept = num_accepted + 1
        self.policy_cache.commit(kept)
        if hidden_states is not None:
            width = int(kept.max())
            self.pending_hidden = hidden_states[:, :width]
            self.pending_ids = tokens[:, :width].clamp(min=0)
            self.pending_count = kept
        self.next_token = tokens.gather(-1, num_accepted.unsqueeze(-1)).squeeze(-1)


@dataclass
class _Drafts:
    """One cycle's drafts.

    Attributes:
        tokens: [B, j] drafted tokens (a row's tokens past its `num_drafted` are padding).
        probs: [B, j, V] the distributions they were drawn from (one-hot for rollout drafts), or `None` when every
            draft is verified as one-hot (greedy drafting).
        num_drafted: [B] drafts of each row.
        head_rows: [B] rows drafted by the head (the others by the rollouts, or not at all).
        confidence: [B, j'] top probability of the head's draft distributions, with a draft-length policy.
        head_confidence: [B] top probability of the head's first draft distribution, with a rollout drafter.
        scores: [B, j] the rollout drafts' scores, with a rollout drafter.
    """

    tokens: torch.LongTensor
    probs: torch.Tensor | None
    num_drafted: torch.LongTensor
    head_rows: torch.BoolTensor
    confidence: torch.Tensor | None = None
    head_confidence: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    def merged(self, head: "_Drafts", head_rows: torch.BoolTensor) -> "_Drafts":
        """These rollout drafts with the rows `head_rows` taken from the head's drafts `head`."""
        width = max(self.tokens.shape[1], head.tokens.shape[1])
        pick = head_rows.unsqueeze(-1)
        probs = None
        if self.probs is not None:
            probs = torch.where(pick.unsqueeze(-1), _padded(head.probs, width), _padded(self.probs, width))
        return _Drafts(
            tokens=torch.where(pick, _padded(head.tokens, width), _padded(self.tokens, width)),
            probs=probs,
            num_drafted=torch.where(head_rows, head.num_drafted, self.num_drafted),
            head_rows=head_rows,
            confidence=head.confidence,
            head_confidence=self.head_confidence,
            scores=_padded(self.scores, width),
        )


@dataclass
class _RolloutProposals:
    """What the rollouts propose for every row: `tokens` and `scores` [B, k] (the first `counts[b]` valid) and the
    expected number of them accepted [B]."""

    tokens: torch.LongTensor
    scores: torch.Tensor
    counts: torch.LongTensor
    expected: torch.Tensor

    def as_drafts(self, vocab_size: int | None) -> _Drafts:
        """As drafts, with one-hot distributions over `vocab_size` tokens (None: verified as one-hot without)."""
        width = int(self.counts.max())
        tokens = self.tokens[:, :width]
        probs = None
        if vocab_size is not None:
            probs = torch.zeros(*tokens.shape, vocab_size, device=tokens.device).scatter_(
                -1, tokens.unsqueeze(-1), 1.0
            )
        head_rows = torch.zeros_like(self.counts, dtype=torch.bool)
        return _Drafts(tokens, probs, self.counts, head_rows, scores=self.scores[:, :width])


def _padded(values: torch.Tensor, width: int) -> torch.Tensor:
    """`values` [B, j, ...] zero-padded to [B, width, ...]."""
    missing = width - values.shape[1]
    if not missing:
        return values
    return torch.cat([values, values.new_zeros(values.shape[0], missing, *values.shape[2:])], dim=1)


class _Completions:
    """Output buffers: completion ids, log-probs and entropies per completion, plus the acceptance counters."""

    def __init__(self, batch_size: int, max_new_tokens: int, k: int, pad_token_id: int, eos_ids: torch.LongTensor):
        device = eos_ids.device
        # Room for the last cycle's overshoot past max_new_tokens, so that writes need no bounds checks.
        width = max_new_tokens + k + 1
        self.ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch_size, width, device=device)
        self.entropy = torch.zeros(batch_size, width, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_new_tokens, self.k, self.eos_ids = max_new_tokens, k, eos_ids
        self.drafts_per_row = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.draft_tokens_per_row = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.accepted_per_row = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.accepted_per_position = torch.zeros(k, dtype=torch.long, device=device)
        self.drafted_per_position = torch.zeros(k, dtype=torch.long, device=device)
        self.rollout_drafts = self.rollout_draft_tokens = self.rollout_accepted_tokens = 0

    def append(
        self, rows: torch.LongTensor, tokens: torch.LongTensor, count: torch.LongTensor, probs: torch.Tensor
    ) -> torch.BoolTensor:
        """Appends the first `count` of `tokens` [B, T] to `rows`, cut after EOS and at `max_new_tokens`.

        Args:
            rows: [B] completions the tokens belong to.
            tokens: [B, T] emitted tokens (-1 past `count`).
            count: [B] number of tokens emitted per row.
            probs: [B, T, V] the processed policy distributions the tokens were drawn from.

        Returns:
            [B] which rows have ended.
        """
        # Slots past every row's count are never written: their log-probs and entropies are not computed.
        width = int(count.max())
        tokens, probs = tokens[:, :width], probs[:, :width]
        slot = torch.arange(width, device=tokens.device)
        is_eos = torch.isin(tokens, self.eos_ids) & (slot < count.unsqueeze(-1))
        hit_eos = is_eos.any(dim=-1)
        count = torch.where(hit_eos, is_eos.int().argmax(dim=-1) + 1, count)
        count = torch.minimum(count, self.max_new_tokens - self.lengths[rows])
        keep = slot < count.unsqueeze(-1)
        tokens = tokens.clamp(min=0)
        index = (rows.unsqueeze(-1), self.lengths[rows].unsqueeze(-1) + slot)
        self.ids[index] = torch.where(keep, tokens, self.ids[index])
        self.logprobs[index] = torch.where(keep, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log(), 0.0)
        self.entropy[index] = torch.where(keep, -torch.xlogy(probs, probs).sum(dim=-1), 0.0)
        self.lengths[rows] += count
        return hit_eos | (self.lengths[rows] >= self.max_new_tokens)

    def count_drafts(
        self,
        rows: torch.LongTensor,
        num_accepted: torch.LongTensor,
        num_drafted: torch.LongTensor,
        from_rollouts: torch.BoolTensor,
    ) -> None:
        """Adds one cycle's acceptance counts of `rows`, which drafted `num_drafted[b]` tokens each, from the
        rollouts where `from_rollouts` (a no-op without drafting). A row that drafted nothing counts no cycle."""
        if self.k:
            positions = torch.arange(self.k, device=num_accepted.device)
            drafted = num_drafted > 0
            rows, num_accepted, num_drafted = rows[drafted], num_accepted[drafted], num_drafted[drafted]
            from_rollouts = from_rollouts[drafted]
            self.rollout_drafts += int(from_rollouts.sum())
            self.rollout_draft_tokens += int(num_drafted[from_rollouts].sum())
            self.rollout_accepted_tokens += int(num_accepted[from_rollouts].sum())
            self.drafts_per_row[rows] += 1
            self.draft_tokens_per_row[rows] += num_drafted
            self.accepted_per_row[rows] += num_accepted
            self.drafted_per_position += (num_drafted.unsqueeze(-1) > positions).sum(dim=0)
            self.accepted_per_position += (num_accepted.unsqueeze(-1) > positions).sum(dim=0)

    def output(self) -> GenerationOutput:
        length = int(self.lengths.max())
        mask = (torch.arange(length, device=self.lengths.device) < self.lengths.unsqueeze(-1)).long()
        entropy = self.entropy[:, :length]
        num_drafts = int(self.drafts_per_row.sum())
        stats = AcceptanceStats(
            num_speculative_tokens=self.k,
            num_drafts=num_drafts,
            num_draft_tokens=int(self.draft_tokens_per_row.sum()),
            num_accepted_tokens=int(self.accepted_per_position.sum()),
            accepted_per_position=self.accepted_per_position.cpu(),
            drafted_per_position=self.drafted_per_position.cpu(),
            drafts_per_row=self.drafts_per_row.cpu(),
            draft_tokens_per_row=self.draft_tokens_per_row.cpu(),
            accepted_per_row=self.accepted_per_row.cpu(),
            entropy=entropy,
            mean_entropy=float(entropy[mask.bool()].mean()),
            mean_entropy_per_row=(entropy.sum(dim=-1) / self.lengths.clamp(min=1)).cpu(),
            num_rollout_drafts=self.rollout_drafts,
            num_rollout_draft_tokens=self.rollout_draft_tokens,
            num_rollout_accepted_tokens=self.rollout_accepted_tokens,
        )
        return GenerationOutput(self.ids[:, :length], mask, self.logprobs[:, :length], stats)


class _Queue:
    """The completions waiting for a row, in order, and the prompts they share."""

    def __init__(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor):
        self.prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        self.keys = [tuple(prompt) for prompt in self.prompts]
        self.waiting = list(range(len(self.prompts)))
        self.prefilled: dict[tuple[int, ...], _Prompt] = {}
        self._count: dict[tuple[int, ...], int] = {}
        for key in self.keys:
            self._count[key] = self._count.get(key, 0) + 1

    def __len__(self) -> int:
        return len(self.waiting)

    def pop(self, n: int) -> list[int]:
        taken, self.waiting = self.waiting[:n], self.waiting[n:]
        return taken

    def missing(self, requests: list[int]) -> list[tuple[int, ...]]:
        """The distinct prompts of `requests` not prefilled yet, in order."""
        return list(dict.fromkeys(self.keys[r] for r in requests if self.keys[r] not in self.prefilled))

    def admitted(self, request: int) -> _Prompt:
        """The prefilled prompt of `request`, forgotten once its last completion is admitted."""
        key = self.keys[request]
        prompt = self.prefilled[key]
        prompt.waiting -= 1
        if not prompt.waiting:
            del self.prefilled[key]
        return prompt

    def total(self, key: tuple[int, ...]) -> int:
        return self._count[key]


class SpeculativeGenerator:
    """Batched speculative sampling with an MTP draft head, in plain PyTorch.

    Each cycle the head drafts `num_speculative_tokens` tokens, the policy scores the last emitted token and the
    drafts in one cached forward pass, and [`rejection_sample`][bebop_trl.speculative.rejection_sample] keeps a
    prefix of the drafts plus one token of its own. The completions are distributed exactly as sampling from the
    policy with the same temperature / top-k / top-p; with `head=None` the same loop is plain sampling, the baseline
    for every speed-up. Rows are batched continuously: see [`generate`][bebop_trl.SpeculativeGenerator.generate]'s
    `max_batch_size`.

    Args:
        model: The policy, a Hugging Face causal LM (a PEFT wrapper is fine) with full attention in every layer.
        head: The draft head; it is checked against `model` and bound to it (it shares the model's embedding and
            lm_head). `None` disables speculation.
        num_speculative_tokens: Tokens drafted per cycle (k >= 1), or the most drafted per cycle with a
            `draft_length` policy. `"auto"` drafts up to 4 per cycle with an
            [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength] whose step costs are
            calibrated on the first batch generated (a few policy and head steps over as many rows as are decoded
            at once), then replaced by the cycle times it measures at each batch size.
        draft_sampling: `"probabilistic"` samples drafts from the head's processed distribution q and accepts with
            `min(1, p/q)`; `"greedy"` drafts the head's argmax and accepts with probability `p(draft)`.
        small_batch_linear: Compute the `nn.Linear` layers of the policy and the head as `(W @ x.T).T` when their
            input has at most 16 rows, during `generate` and in its thread only (see
            `bebop_trl.speculative.small_batch_linear`): `True` for every such product, `"auto"` for the weight
            shapes and row counts where that path is measured faster than `F.linear` (each timed once per
            process). Results change only by float rounding. Off by default because whether it helps depends on the
            CPU's BLAS, the thread count and the load, and because with `"auto"` the path, hence the rounding,
            follows timings. `benchmarks/bench_step_cost.py` measures the paths.
        draft_length: Chooses the draft length per cycle (see
            [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength]): drafting stops when one
            more draft is predicted to lower the tokens per unit cost. The rule reads the head's distributions only,
            so the output keeps the policy's law. The policy learns from every cycle verified.
        rejection_sample_method: How drafts are verified: `"standard"` token by token, `"block"` jointly (block
            verification, which accepts at least as many drafts on average); both keep the policy's law.
        rollout_drafter: Also draft from the other completions of each row's prompt (the row's GRPO group, and the
            earlier calls' completions the drafter remembers), per row and cycle when they are predicted to be
            accepted more than the head's drafts (see
            [`RolloutDrafter`][bebop_trl.speculative.rollout_drafts.RolloutDrafter]); without a head, the only
            drafter. Up to `num_speculative_tokens` drafts per cycle either way.

    Raises:
        ValueError: If `num_speculative_tokens < 1`, `draft_sampling` or `rejection_sample_method` is unknown, the
            head does not match the model, or the model's cache cannot drop rejected drafts (recurrent or
            sliding-window layers).

    Example:
        ```python
        head = MTPHead.from_pretrained("my-head", policy=model)
        generator = SpeculativeGenerator(model, head, num_speculative_tokens=3)
        out = generator.generate(input_ids, attention_mask, max_new_tokens=256, temperature=1.0)
        print(out.stats.acceptance_rate, out.stats.accepted_drafts_per_cycle)
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        head: MTPHead | None = None,
        num_speculative_tokens: int | Literal["auto"] = 3,
        draft_sampling: str = "probabilistic",
        small_batch_linear: bool | Literal["auto"] = False,
        draft_length: AdaptiveDraftLength | None = None,
        rejection_sample_method: str = "standard",
        rollout_drafter: RolloutDrafter | None = None,
    ):
        # "auto": the step costs are measured on the first batch generated, then kept.
        self._calibrate_draft_length = num_speculative_tokens == "auto" and draft_length is None and head is not None
        if num_speculative_tokens == "auto":
            num_speculative_tokens = AUTO_MAX_DRAFT_TOKENS
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1 or 'auto', got {num_speculative_tokens!r}.")
        if draft_length is not None and draft_length.max_draft_tokens < num_speculative_tokens:
            raise ValueError(
                f"draft_length knows the costs of up to {draft_length.max_draft_tokens} drafts, fewer than "
                f"num_speculative_tokens={num_speculative_tokens}: give its StepCosts verify costs for up to "
                f"{num_speculative_tokens + 1} tokens, or lower num_speculative_tokens."
            )
        if draft_sampling not in DRAFT_SAMPLING_MODES:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING_MODES}, got {draft_sampling!r}.")
        if small_batch_linear not in (True, False, "auto"):
            raise ValueError(f"small_batch_linear must be True, False or 'auto', got {small_batch_linear!r}.")
        if rejection_sample_method not in REJECTION_SAMPLE_METHODS:
            raise ValueError(
                f"rejection_sample_method must be one of {REJECTION_SAMPLE_METHODS}, got {rejection_sample_method!r}."
            )
        probe = DynamicCache(config=model.config)
        # The engine's cache drops rejected slots of attention layers; recurrent and sliding-window layers keep a
        # state that this layout cannot hold.
        self._slot_cache = all(
            isinstance(layer, CacheLayerMixin)
            and not isinstance(layer, LinearAttentionCacheLayerMixin)
            and not layer.is_sliding
            for layer in probe.layers
        )
        if head is not None:
            # Shapes and architecture must match; the base-model name is checked when a head is loaded for a
            # policy, and a policy under RL may be saved under any name.
            head.bind(model, check_base_model=False)
            if not self._slot_cache:
                raise ValueError(
                    f"Speculative decoding needs a KV cache that can drop rejected drafts, but "
                    f"{model.config.model_type!r} has layers whose state cannot be rolled back (e.g. linear or "
                    "sliding-window attention). Use head=None for plain sampling."
                )
        self.model = model
        self.head = head
        self.num_speculative_tokens = num_speculative_tokens
        self.draft_sampling = draft_sampling
        self.small_batch_linear = small_batch_linear
        self.draft_length = draft_length
        self.rejection_sample_method = rejection_sample_method
        self.rollout_drafter = rollout_drafter
        if rollout_drafter is not None and not self._slot_cache:
            raise ValueError(
                f"Rollout drafts need a KV cache that can drop rejected drafts, but {model.config.model_type!r} has "
                "layers whose state cannot be rolled back. Use rollout_drafter=None."
            )
        output_embeddings = model.get_output_embeddings()
        self._vocab_size = (
            output_embeddings.weight.shape[0] if output_embeddings is not None else model.config.vocab_size
        )
        self._num_layers = len(probe.layers) or model.config.get_text_config().num_hidden_layers

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        max_batch_size: int | None = None,
        progress: bool = False,
    ) -> GenerationOutput:
        """Samples completions for a batch of left-padded prompts.

        Args:
            input_ids: [B, P] prompt ids, left-padded. Rows with the same prompt (a GRPO group) share its prefill.
            attention_mask: [B, P] 1 for prompt tokens, 0 for left padding (default: all ones).
            max_new_tokens: Maximum number of tokens generated per row.
            temperature: Sampling temperature; 0 is greedy decoding.
            top_p: Nucleus sampling mass (1 disables it).
            top_k: Top-k cut-off (0 disables it).
            eos_token_id: Token id(s) that end a row (default: the model's `generation_config`; `[]` for none).
            generator: Random generator on the model's device, for reproducible runs.
            max_batch_size: The most rows decoded at once (default: all). The other rows wait, in order, and take
                the place of the rows that end.
            progress: Show a progress bar over the generated tokens.

        Returns:
            The completions, their log-probabilities under the processed policy distribution, and statistics.

        Raises:
            ValueError: On an empty or right-padded prompt or out-of-range sampling parameters.
        """
        validate_sampling_params(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (or None for all rows at once), got {max_batch_size}.")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, prompt_length] tensor, got {input_ids.shape}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dtype=torch.long, device=input_ids.device)
        if not attention_mask.any(dim=-1).all():
            raise ValueError("Every prompt needs at least one token: a row of attention_mask is all zeros.")
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("Prompts must be left-padded (padding before the tokens, as with padding_side='left').")

        sampling = _SamplingParams(temperature, top_k, top_p, generator)
        drafting = self.head is not None or self.rollout_drafter is not None
        k = self.num_speculative_tokens if drafting else 0
        eos_ids = torch.tensor(self._eos_token_ids(eos_token_id), dtype=torch.long, device=input_ids.device)
        linear_path = (
            small_batch_linear(self.model, self.head, autotune=self.small_batch_linear == "auto")
            if self.small_batch_linear
            else contextlib.nullcontext()
        )
        with eval_mode(self.model, self.head), linear_path, self._masked_attention():
            completions = _Completions(input_ids.shape[0], max_new_tokens, k, self._pad_token_id(), eos_ids)
            queue = _Queue(input_ids, attention_mask)
            rows = max_batch_size or len(queue)
            if self._calibrate_draft_length:  # on as many rows as are decoded at once
                self.draft_length = calibrate_draft_length(
                    self.model,
                    self.head,
                    input_ids[:rows],
                    attention_mask[:rows],
                    max_draft_tokens=k,
                    temperature=temperature,
                )
                self._calibrate_draft_length = False
            decode = self._decode if self._slot_cache else self._decode_static
            with tqdm(total=max_new_tokens * len(queue), disable=not progress, desc="Generating") as bar:
                decode(queue, completions, min(rows, len(queue)), k, sampling, bar)
            output = completions.output()
        if self.rollout_drafter is not None:
            self.rollout_drafter.remember(queue.prompts, output.unpadded(output.completion_ids))
        return output

    def _decode(
        self, queue: _Queue, completions: _Completions, rows: int, k: int, sampling: _SamplingParams, bar: tqdm
    ) -> None:
        """Decodes every waiting completion, `rows` at a time."""
        device = completions.ids.device
        longest = max(len(p) for p in queue.prompts)
        capacity = longest + completions.max_new_tokens + k + 2
        batch = _Batch(
            requests=torch.zeros(rows, dtype=torch.long, device=device),
            policy_cache=SlotCache(self._num_layers, rows, capacity, device),
            head_cache=None if self.head is None else SlotCache(len(self.head.model.layers), rows, capacity, device),
            next_token=torch.zeros(rows, dtype=torch.long, device=device),
        )
        session = None if self.rollout_drafter is None else self.rollout_drafter.session(queue.prompts)
        finished = torch.ones(rows, dtype=torch.bool, device=device)
        while True:
            finished = self._refill(batch, finished, queue, completions, sampling, session)
            if finished.all():
                return
            if finished.any():
                batch.select((~finished).nonzero().squeeze(-1))
            tokens, num_accepted, probs, drafts = self._decode_cycle(batch, k, sampling, session)
            completions.count_drafts(batch.requests, num_accepted, drafts.num_drafted, ~drafts.head_rows)
            before = completions.lengths[batch.requests]
            finished = completions.append(batch.requests, tokens, num_accepted + 1, probs)
            if session is not None:
                _follow(session, completions, batch.requests, before)
            bar.update(int(completions.lengths.sum()) - bar.n)

    def _decode_static(
        self, queue: _Queue, completions: _Completions, rows: int, k: int, sampling: _SamplingParams, bar: tqdm
    ) -> None:
        """Plain sampling for models whose cache cannot take the engine's layout (recurrent or sliding-window
        layers): the model's own cache, `rows` completions at a time, each group until its last row ends."""
        device = completions.ids.device
        while len(queue):
            requests = torch.tensor(queue.pop(rows), device=device)
            prompts = [queue.prompts[r] for r in requests.tolist()]
            input_ids, attention_mask = _left_padded(prompts, device)
            cache = DynamicCache(config=self.model.config)
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                **with_cache(cache),
                use_cache=True,
                logits_to_keep=1,
            )
            position = attention_mask.sum(dim=-1)
            while True:
                probs = sampling.probs(outputs.logits[:, -1:])
                token = sample(probs[:, 0], sampling.generator)
                finished = completions.append(requests, token.unsqueeze(-1), torch.ones_like(token), probs)
                bar.update(int(completions.lengths.sum()) - bar.n)
                if finished.all():
                    break
                if finished.any():
                    keep = (~finished).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    requests, token, position, attention_mask = (
                        t[keep] for t in (requests, token, position, attention_mask)
                    )
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=-1)
                outputs = self.model(
                    input_ids=token.unsqueeze(-1),
                    attention_mask=attention_mask,
                    position_ids=position.unsqueeze(-1),
                    **with_cache(cache),
                    use_cache=True,
                )
                position = position + 1

    # ------------------------------------------------------------------------------------------------ admission

    def _refill(
        self,
        batch: _Batch,
        finished: torch.BoolTensor,
        queue: _Queue,
        completions: _Completions,
        sampling: _SamplingParams,
        session: DraftSession | None,
    ) -> torch.BoolTensor:
        """Gives the finished rows to waiting completions, as long as there are any; returns which rows are still
        finished (they leave the batch)."""
        while finished.any() and len(queue):
            free = finished.nonzero().squeeze(-1)
            requests = queue.pop(len(free))
            slots = free[: len(requests)]
            probs = self._admit(batch, slots, requests, queue, sampling)
            first = batch.next_token[slots]
            ended = completions.append(
                batch.requests[slots], first.unsqueeze(-1), torch.ones_like(first), probs.unsqueeze(1)
            )
            if session is not None:
                for request, token in zip(requests, first.tolist(), strict=True):
                    session.start(request, token)
            finished = finished.clone()
            finished[slots] = ended
        return finished

    def _admit(
        self, batch: _Batch, slots: torch.LongTensor, requests: list[int], queue: _Queue, sampling: _SamplingParams
    ) -> torch.Tensor:
        """Starts completions `requests` in rows `slots`: loads their prompts' KV (prefilling the prompts not seen
        yet), samples their first tokens and queues each prompt's last slot for the head.

        Returns:
            [n, V] the distributions the first tokens were sampled from.
        """
        missing = queue.missing(requests)
        if missing:
            self._prefill(missing, queue, sampling)
        prompts = [queue.admitted(r) for r in requests]
        device = slots.device
        lengths = torch.tensor([p.length for p in prompts], device=device)
        probs = torch.stack([p.probs for p in prompts])
        first = sample(probs, sampling.generator)
        batch.requests[slots] = torch.tensor(requests, device=device)
        batch.next_token[slots] = first
        batch.policy_cache.load(slots, *_stacked(prompts, "keys", "values"), lengths)
        if self.head is None:
            return probs
        batch.head_cache.load(slots, *_stacked(prompts, "head_keys", "head_values"), lengths - 1)
        features = torch.stack([p.last_feature for p in prompts])
        if batch.pending_hidden is None:
            rows, hidden_size = len(batch.requests), features.shape[-1]
            batch.pending_hidden = features.new_zeros(rows, 1, hidden_size)
            batch.pending_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
            batch.pending_count = torch.zeros(rows, dtype=torch.long, device=device)
        batch.pending_hidden[slots, 0] = features.to(batch.pending_hidden.dtype)
        batch.pending_ids[slots, 0] = first
        batch.pending_count[slots] = 1
        return probs

    def _prefill(self, prompts: list[tuple[int, ...]], queue: _Queue, sampling: _SamplingParams) -> None:
        """Runs the policy (and the head) over distinct prompts once, for every completion that will share them."""
        input_ids, attention_mask = _left_padded(prompts, self.model.get_input_embeddings().weight.device)
        position_ids = positions_from_mask(attention_mask)
        cache = DynamicCache(config=self.model.config)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **with_cache(cache),
            use_cache=True,
            output_hidden_states=self.head is not None,
            logits_to_keep=1,
        )
        lengths = attention_mask.sum(dim=-1)
        keys = [strip_left_padding(layer.keys, lengths) for layer in cache.layers]
        values = [strip_left_padding(layer.values, lengths) for layer in cache.layers]
        probs = sampling.probs(outputs.logits[:, -1])
        head_keys = head_values = features = None
        if self.head is not None:
            features = self.head.policy_features(outputs.hidden_states)
            head_keys, head_values = self._prefill_head(features, input_ids, attention_mask, position_ids, lengths)
        for row, prompt in enumerate(prompts):
            length = len(prompt)
            queue.prefilled[prompt] = _Prompt(
                keys=[k[row, :, :length] for k in keys],
                values=[v[row, :, :length] for v in values],
                head_keys=None if head_keys is None else [k[row, :, : length - 1] for k in head_keys],
                head_values=None if head_values is None else [v[row, :, : length - 1] for v in head_values],
                probs=probs[row],
                last_feature=None if features is None else features[row, -1],
                waiting=queue.total(prompt),
            )

    def _prefill_head(
        self,
        features: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        position_ids: torch.LongTensor,
        lengths: torch.LongTensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The head's KV of the prompts' slots whose next token is still in the prompt (all but the last), from slot
        0; the last slot pairs with each completion's own first token, so it waits for the first catch-up."""
        if input_ids.shape[1] == 1:
            config = self.head.model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            empty = features.new_zeros(len(features), config.num_key_value_heads, 0, head_dim)
            return [empty] * len(self.head.model.layers), [empty] * len(self.head.model.layers)
        cache = self.head.new_cache()
        self.head(
            features[:, :-1],
            input_ids[:, 1:],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, :-1] + 1,
            past_key_values=cache,
            use_cache=True,
        )
        shortened = (lengths - 1).clamp(min=1)
        keys = [strip_left_padding(layer.keys, shortened) for layer in cache.layers]
        values = [strip_left_padding(layer.values, shortened) for layer in cache.layers]
        return keys, values

    # ------------------------------------------------------------------------------------------------ one cycle

    def _decode_cycle(
        self, batch: _Batch, k: int, sampling: _SamplingParams, session: DraftSession | None
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor, "_Drafts"]:
        """Drafts up to k tokens per row, verifies them with one policy forward, rejection-samples and advances.

        Returns:
            `tokens` [B, j + 1] and `num_accepted` [B] as from `rejection_sample`, the processed policy
            distributions [B, j + 1, V] of the verified slots, and the cycle's drafts (j drafts at most per row).
        """
        draft_length = self.draft_length
        if draft_length is not None:
            draft_length.begin_cycle(len(batch.requests))
            started = time.perf_counter()
        drafts = self._draft(batch, k, sampling, session)
        tokens, num_accepted, probs = self._verify(batch, drafts, sampling)
        head_rows = drafts.head_rows
        if draft_length is not None and drafts.confidence is not None and head_rows.any():
            synchronize(num_accepted.device)
            seconds = time.perf_counter() - started
            draft_length.update(drafts.confidence[head_rows], num_accepted[head_rows])
            draft_length.end_cycle(drafts.confidence.shape[1], int((num_accepted + 1).sum()), seconds)
        if session is not None:
            session.drafter.record(
                ~head_rows & (drafts.num_drafted > 0),
                drafts.head_confidence,
                drafts.scores,
                drafts.num_drafted,
                num_accepted,
            )
        return tokens, num_accepted, probs, drafts

    def _verify(
        self, batch: _Batch, drafts: "_Drafts", sampling: _SamplingParams
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
        """Scores `next_token` and the drafts with one policy forward, rejection-samples and advances the rows.

        Args:
            batch: The rows; each row's policy cache keeps its accepted slots.
            drafts: The cycle's drafts (none: a plain sampling step).
            sampling: Temperature, top-k, top-p and the random generator.

        Returns:
            As `_decode_cycle`, without the drafts.
        """
        width = drafts.tokens.shape[1] + 1
        cache = batch.policy_cache
        mask = self._attention_mask(cache.open(width), self.model)
        outputs = self.model(
            input_ids=torch.cat([batch.next_token.unsqueeze(-1), drafts.tokens], dim=-1),
            attention_mask=mask,
            position_ids=cache.write_positions,
            **with_cache(cache),
            use_cache=True,
            output_hidden_states=self.head is not None,
        )
        target_probs = sampling.probs(outputs.logits)
        tokens, num_accepted = rejection_sample(
            drafts.tokens,
            drafts.probs,
            target_probs,
            sampling.generator,
            num_drafts=drafts.num_drafted,
            method=self.rejection_sample_method,
        )
        pending = self.head.policy_features(outputs.hidden_states) if self.head is not None else None
        batch.advance(tokens, num_accepted, pending)
        return tokens, num_accepted, target_probs

    def _draft(self, batch: _Batch, k: int, sampling: _SamplingParams, session: DraftSession | None) -> "_Drafts":
        """Drafts each row from the head or, with a rollout drafter, from the rollouts of its prompt.

        The head runs a catch-up step that yields the first draft, then up to k - 1 recurrent steps. The catch-up
        writes the head's cache slots for the tokens emitted since the last cycle from the policy's own hidden
        states (every cycle, whichever source drafts); its output at the newest token gives the first draft
        distribution. The k - 1 later steps feed the head's own output back; their cache slots are dropped
        afterwards, since the next catch-up rewrites the accepted ones from the policy's hidden states. With a
        draft-length policy, drafting stops after any step where the policy judges one more draft not worth its
        cost. A row drafts from the rollouts when their predicted accepted drafts beat the head's, which reads
        the head's first draft distribution before anything is drafted from it. Every rule reads only what was
        generated before the cycle and the head's distributions, so the output keeps the policy's law.
        """
        rows, device = batch.next_token.shape[0], batch.next_token.device
        rollout = self._rollout_drafts(batch, k, session, device)
        if self.head is None:
            if rollout is None:
                empty = torch.empty(rows, 0, dtype=torch.long, device=device)
                return _Drafts(empty, None, torch.zeros_like(batch.next_token), torch.zeros(rows, dtype=torch.bool))
            return rollout.as_drafts(None if self._greedy(sampling) else self._vocab_size)
        hidden, logits = self._catch_up(batch)
        first = sampling.probs(logits)
        head_confidence = first.max(dim=-1).values
        head_rows = torch.ones(rows, dtype=torch.bool, device=device)
        if rollout is not None:
            predicted = session.drafter.predicted_head_drafts(head_confidence, k)
            head_rows = predicted >= rollout.expected
        head = self._head_drafts(batch, k, sampling, hidden, logits, first, head_rows) if head_rows.any() else None
        batch.head_cache.discard()
        if rollout is None:
            return head
        drafts = rollout.as_drafts(None if self._greedy(sampling) else self._vocab_size)
        drafts.head_confidence = head_confidence
        if head is not None:
            drafts = drafts.merged(head, head_rows)
        return drafts

    def _catch_up(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the pending slots to the head's cache; returns the head's output at each row's newest token [B, H]
        and the first draft's logits from it [B, |D|] (over the draft vocabulary)."""
        cache = batch.head_cache
        rows = batch.next_token.shape[0]
        mask = self._attention_mask(cache.open(batch.pending_hidden.shape[1]), self.head.model)
        catch_up = self.head(
            batch.pending_hidden,
            batch.pending_ids,
            attention_mask=mask,
            position_ids=cache.write_positions + 1,
            past_key_values=cache,
            use_cache=True,
        )
        cache.commit(batch.pending_count)
        newest = catch_up.last_hidden_state[torch.arange(rows, device=cache.lengths.device), batch.pending_count - 1]
        return newest, self.head.compute_draft_logits(newest)

    def _head_drafts(
        self,
        batch: _Batch,
        k: int,
        sampling: _SamplingParams,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        first: torch.Tensor,
        head_rows: torch.BoolTensor,
    ) -> "_Drafts":
        """Samples the head's drafts for every row (the rows of `head_rows` decide when to stop), from the head's
        output at the newest token, the first draft's logits and its processed distribution (over the draft
        vocabulary)."""
        greedy = self._greedy(sampling)
        cache = batch.head_cache
        tokens, probs, confidences = [], [], []
        for step in range(k):
            if step > 0:
                mask = self._attention_mask(cache.open(1), self.head.model)
                hidden = self.head(
                    hidden.unsqueeze(1),
                    tokens[-1].unsqueeze(-1),
                    attention_mask=mask,
                    position_ids=cache.write_positions + 1,
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[:, 0]
                # Over the draft vocabulary only (the whole vocabulary without one): q is 0 outside it, so
                # processing, sampling and the argmax over D give what they give over the -inf-padded [B, V]
                # logits, for less.
                logits = self.head.compute_draft_logits(hidden)
                first = sampling.probs(logits)
            if greedy:
                index = logits.argmax(dim=-1)
            else:
                index = sample(first, sampling.generator)
                probs.append(self.head.to_vocabulary(first, fill=0.0))
            tokens.append(index if self.head.draft_vocab is None else self.head.draft_vocab[index])
            if self.draft_length is not None:
                confidences.append(first.max(dim=-1).values)
                if not self.draft_length.keep_drafting([c[head_rows] for c in confidences]):
                    break
        drafted = torch.stack(tokens, dim=1)
        return _Drafts(
            tokens=drafted,
            probs=torch.stack(probs, dim=1) if probs else None,
            num_drafted=torch.full_like(batch.next_token, drafted.shape[1]),
            head_rows=head_rows,
            confidence=torch.stack(confidences, dim=1) if confidences else None,
        )

    def _rollout_drafts(
        self, batch: _Batch, k: int, session: DraftSession | None, device: torch.device
    ) -> "_RolloutProposals | None":
        """What the rollouts of each row's prompt propose (None without a rollout drafter)."""
        if session is None:
            return None
        proposals = [session.propose(request, k) for request in batch.requests.tolist()]
        rows = len(proposals)
        tokens = torch.zeros(rows, k, dtype=torch.long)
        scores = torch.zeros(rows, k, dtype=torch.float64)
        for row, proposal in enumerate(proposals):
            tokens[row, : len(proposal.tokens)] = torch.tensor(proposal.tokens, dtype=torch.long)
            scores[row, : len(proposal.scores)] = torch.tensor(proposal.scores, dtype=torch.float64)
        counts = torch.tensor([len(p.tokens) for p in proposals], dtype=torch.long, device=device)
        tokens, scores = tokens.to(device), scores.to(device)
        return _RolloutProposals(tokens, scores, counts, session.drafter.predicted_rollout_drafts(scores, counts))

    def _greedy(self, sampling: _SamplingParams) -> bool:
        """Whether drafts are argmaxes (verified as one-hot distributions) rather than samples."""
        return self.draft_sampling == "greedy" or sampling.temperature == 0

    # ---------------------------------------------------------------------------------------------------- config

    @contextlib.contextmanager
    def _masked_attention(self) -> Iterator[None]:
        """Runs the policy with an attention implementation that reads the engine's 4D masks."""
        if attn_implementation(self.model) in _MASKED_ATTENTION:
            yield
            return
        with attention_implementation(self.model, "sdpa"):
            yield

    @staticmethod
    def _attention_mask(allowed: torch.BoolTensor, model: nn.Module) -> torch.Tensor:
        """The 4D mask `allowed` in the form the model's attention reads: boolean for SDPA, additive for eager."""
        if attn_implementation(model) != "eager":
            return allowed
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _eos_token_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def _pad_token_id(self) -> int:
        generation_config = getattr(self.model, "generation_config", None)
        pad = getattr(generation_config, "pad_token_id", None)
        if pad is None:
            eos = self._eos_token_ids(None)
            pad = eos[0] if eos else 0
        return pad


def _follow(
    session: DraftSession, completions: _Completions, requests: torch.LongTensor, before: torch.LongTensor
) -> None:
    """Shows the rollout drafter the tokens each row just emitted (the completion lengths were `before`)."""
    after = completions.lengths[requests]
    for request, start, end in zip(requests.tolist(), before.tolist(), after.tolist(), strict=True):
        session.extend(request, completions.ids[request, start:end].tolist())


def _left_padded(prompts: list, device: torch.device) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(input_ids, attention_mask)` of token id sequences, left-padded with 0."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _stacked(prompts: list[_Prompt], keys: str, values: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the prompts' `keys` / `values` attribute stacked into [n, heads, longest, head_dim] (zero-padded
    after each prompt's slots)."""
    first = getattr(prompts[0], keys)
    stacked_keys, stacked_values = [], []
    for layer in range(len(first)):
        for name, out in ((keys, stacked_keys), (values, stacked_values)):
            states = [getattr(p, name)[layer] for p in prompts]
            longest = max(s.shape[1] for s in states)
            padded = states[0].new_zeros(len(states), states[0].shape[0], longest, states[0].shape[-1])
            for i, s in enumerate(states):
                padded[i, :, : s.shape[1]] = s
            out.append(padded)
    return stacked_keys, stacked_values


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Puts the modules in eval mode (no dropout while sampling) and restores their training flags afterwards."""
    modules = [m for m in modules if m is not None]
    training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in zip(modules, training, strict=True):
            module.train(was_training)
