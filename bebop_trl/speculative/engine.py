"""The speculative decoding engine: an MTP head drafts, the policy verifies, rejection sampling keeps it exact.

Cache layout. The policy's and the head's KV caches have the same slots and share one 2D attention mask. Policy
slot i holds token x_s at position s; head slot i holds the head's step on the policy's hidden state of slot i and
the token after it, x_{s+1}, at position s + 1. A verify pass appends k + 1 slots to the policy cache for every
row, and the next cycle's head catch-up appends the same slots to the head cache. Slots after a row's accepted
tokens stay in the caches but are masked out, and slots that no row kept are cropped, so rows advance by different
amounts with plain batched forwards, per-row `position_ids` and no per-row cache surgery. Finished rows leave the
batch.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..modeling import MTPHead
from ..modeling.model_inputs import positions_from_mask, with_cache
from ..modeling.vllm_export import DRAFT_SAMPLING_MODES
from .draft_length import AUTO_MAX_DRAFT_TOKENS, AdaptiveDraftLength, calibrate_draft_length
from .rejection import rejection_sample
from .sampling import probs_from_logits, sample, validate_sampling_params
from .small_batch_linear import small_batch_linear
from .stats import AcceptanceStats


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
class _DecodeState:
    """Per-row decoding state of the rows still generating.

    Attributes:
        rows: [B] index of each row in the caller's batch.
        policy_cache: The policy's KV cache (all slots before `next_token`).
        head_cache: The head's KV cache (`None` without a head); it lacks the pending slots until the next
            cycle's catch-up step writes them.
        attention_mask: [B, S] validity of the cache slots, shared by both caches (the head's pending slots
            included).
        next_token: [B] the last emitted token, not yet in the policy cache.
        position: [B] position of `next_token`.
        pending_hidden: [B, m, H] the head's input from the policy (`MTPHead.policy_input`) at the last m policy slots,
            still to be fed to the head.
        pending_ids: [B, m] the token after each of those slots.
        pending_positions: [B, m] positions of `pending_ids`.
        pending_newest: [B] index of the pending slot whose next token is `next_token`.
    """

    rows: torch.LongTensor
    policy_cache: Cache
    head_cache: Cache | None
    attention_mask: torch.LongTensor
    next_token: torch.LongTensor
    position: torch.LongTensor
    pending_hidden: torch.Tensor | None = None
    pending_ids: torch.LongTensor | None = None
    pending_positions: torch.LongTensor | None = None
    pending_newest: torch.LongTensor | None = None

    def select(self, keep: torch.LongTensor) -> None:
        """Keeps only the rows at indices `keep`."""
        for cache in (self.policy_cache, self.head_cache):
            if cache is not None:
                cache.batch_select_indices(keep)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[keep])

    def advance(
        self, tokens: torch.LongTensor, num_accepted: torch.LongTensor, hidden_states: torch.Tensor | None
    ) -> None:
        """Moves past a verified cycle: masks the rejected slots and crops the slots no row kept.

        Args:
            tokens: [B, k + 1] output of `rejection_sample`.
            num_accepted: [B] accepted drafts per row.
            hidden_states: [B, k + 1, H] the head's input from the policy at the verified slots (with a head).
        """
        k = tokens.shape[1] - 1
        kept = int(num_accepted.max()) + 1
        if kept < k + 1:
            self.policy_cache.crop(kept - k - 1)
        slot = torch.arange(kept, device=tokens.device)
        self.attention_mask = torch.cat([self.attention_mask, (slot <= num_accepted.unsqueeze(-1)).long()], dim=-1)
        if hidden_states is not None:
            self.pending_hidden = hidden_states[:, :kept]
            self.pending_ids = tokens[:, :kept].clamp(min=0)
            self.pending_positions = self.position.unsqueeze(-1) + slot + 1
            self.pending_newest = num_accepted
        self.next_token = tokens.gather(-1, num_accepted.unsqueeze(-1)).squeeze(-1)
        self.position = self.position + num_accepted + 1


class _Completions:
    """Output buffers: completion ids, log-probs and entropies per row, plus the acceptance counters."""

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

    def append(
        self, rows: torch.LongTensor, tokens: torch.LongTensor, count: torch.LongTensor, probs: torch.Tensor
    ) -> torch.BoolTensor:
        """Appends the first `count` of `tokens` [B, T] to `rows`, cut after EOS and at `max_new_tokens`.

        Args:
            rows: [B] rows of the output batch.
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

    def count_drafts(self, rows: torch.LongTensor, num_accepted: torch.LongTensor, num_drafted: int) -> None:
        """Adds one cycle's acceptance counts of `rows`, which drafted `num_drafted` tokens each (a no-op without a
        head)."""
        if self.k:
            self.drafts_per_row[rows] += 1
            self.draft_tokens_per_row[rows] += num_drafted
            self.accepted_per_row[rows] += num_accepted
            self.drafted_per_position[:num_drafted] += len(rows)
            positions = torch.arange(self.k, device=num_accepted.device)
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
        )
        return GenerationOutput(self.ids[:, :length], mask, self.logprobs[:, :length], stats)


class SpeculativeGenerator:
    """Batched speculative sampling with an MTP draft head, in plain PyTorch.

    Each cycle the head drafts `num_speculative_tokens` tokens, the policy scores the last emitted token and the
    drafts in one cached forward pass, and [`rejection_sample`][bebop_trl.speculative.rejection_sample] keeps a
    prefix of the drafts plus one token of its own. The completions are distributed exactly as sampling from the
    policy with the same temperature / top-k / top-p; with `head=None` the same loop is plain sampling, the baseline
    for every speed-up.

    Args:
        model: The policy, a Hugging Face causal LM (a PEFT wrapper is fine).
        head: The draft head; it is checked against `model` and bound to it (it shares the model's embedding and
            lm_head). `None` disables speculation.
        num_speculative_tokens: Tokens drafted per cycle (k >= 1), or the most drafted per cycle with a
            `draft_length` policy. `"auto"` drafts up to 4 per cycle with an
            [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength] whose step costs are
            measured on the first batch generated (a few policy and head steps; the costs depend on the batch size,
            so build one generator per batch size).
        draft_sampling: `"probabilistic"` samples drafts from the head's processed distribution q and accepts with
            `min(1, p/q)`; `"greedy"` drafts the head's argmax and accepts with probability `p(draft)`.
        small_batch_linear: Compute the `nn.Linear` layers of the policy and the head as `(W @ x.T).T` when their
            input has at most 16 rows, during `generate` and in its thread only (see
            `bebop_trl.speculative.small_batch_linear`). Results change only by float rounding. Off by default
            because whether it helps depends on the CPU's BLAS, the thread count and the load: on the 2-core
            machine of the step-cost table in the benchmarks docs it made policy passes over 2 to 5 tokens slower.
            Turn it on where `benchmarks/bench_step_cost.py` shows a gain.
        draft_length: Chooses the draft length per cycle (see
            [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength]): drafting stops when one
            more draft is predicted to lower the tokens per unit cost. The rule reads the head's distributions only,
            so the output keeps the policy's law. The policy learns from every cycle verified.

    Raises:
        ValueError: If `num_speculative_tokens < 1`, `draft_sampling` is unknown, the head does not match the
            model, or the model's cache cannot drop rejected drafts (recurrent layers).

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
        small_batch_linear: bool = False,
        draft_length: AdaptiveDraftLength | None = None,
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
        if head is not None:
            # Shapes and architecture must match; the base-model name is checked when a head is loaded for a
            # policy, and a policy under RL may be saved under any name.
            head.bind(model, check_base_model=False)
            if not DynamicCache(config=model.config).is_croppable:
                raise ValueError(
                    f"Speculative decoding needs a KV cache that can drop rejected drafts, but "
                    f"{model.config.model_type!r} has layers whose state cannot be rolled back (e.g. linear "
                    "attention). Use head=None for plain sampling."
                )
        self.model = model
        self.head = head
        self.num_speculative_tokens = num_speculative_tokens
        self.draft_sampling = draft_sampling
        self.small_batch_linear = small_batch_linear
        self.draft_length = draft_length

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
        progress: bool = False,
    ) -> GenerationOutput:
        """Samples completions for a batch of left-padded prompts.

        Args:
            input_ids: [B, P] prompt ids, left-padded.
            attention_mask: [B, P] 1 for prompt tokens, 0 for left padding (default: all ones).
            max_new_tokens: Maximum number of tokens generated per row.
            temperature: Sampling temperature; 0 is greedy decoding.
            top_p: Nucleus sampling mass (1 disables it).
            top_k: Top-k cut-off (0 disables it).
            eos_token_id: Token id(s) that end a row (default: the model's `generation_config`; `[]` for none).
            generator: Random generator on the model's device, for reproducible runs.
            progress: Show a progress bar over the longest completion.

        Returns:
            The completions, their log-probabilities under the processed policy distribution, and statistics.

        Raises:
            ValueError: On an empty or right-padded prompt or out-of-range sampling parameters.
        """
        validate_sampling_params(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
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
        k = self.num_speculative_tokens if self.head is not None else 0
        eos_ids = torch.tensor(self._eos_token_ids(eos_token_id), dtype=torch.long, device=input_ids.device)
        linear_path = (
            small_batch_linear(self.model, self.head) if self.small_batch_linear else contextlib.nullcontext()
        )
        with eval_mode(self.model, self.head), linear_path:
            if self._calibrate_draft_length:
                self.draft_length = calibrate_draft_length(
                    self.model, self.head, input_ids, attention_mask, max_draft_tokens=k, temperature=temperature
                )
                self._calibrate_draft_length = False
            return self._generate(input_ids, attention_mask, max_new_tokens, k, sampling, eos_ids, progress)

    def _generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        max_new_tokens: int,
        k: int,
        sampling: _SamplingParams,
        eos_ids: torch.LongTensor,
        progress: bool,
    ) -> GenerationOutput:
        completions = _Completions(input_ids.shape[0], max_new_tokens, k, self._pad_token_id(), eos_ids)
        state, probs = self._prefill(input_ids, attention_mask, sampling)
        finished = completions.append(state.rows, state.next_token.unsqueeze(-1), torch.ones_like(state.rows), probs)
        with tqdm(total=max_new_tokens, disable=not progress, desc="Generating") as bar:
            while not finished.all():
                if finished.any():
                    state.select((~finished).nonzero().squeeze(-1))
                tokens, num_accepted, probs = self._decode_cycle(state, k, sampling)
                completions.count_drafts(state.rows, num_accepted, num_drafted=tokens.shape[1] - 1)
                finished = completions.append(state.rows, tokens, num_accepted + 1, probs)
                bar.update(int(completions.lengths.max()) - bar.n)
        return completions.output()

    # ------------------------------------------------------------------------------------------------ one cycle

    def _prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, sampling: _SamplingParams
    ) -> tuple[_DecodeState, torch.Tensor]:
        """Runs the policy on the prompts and samples the first token; returns the state and p of that token."""
        position_ids = positions_from_mask(attention_mask)
        policy_cache = DynamicCache(config=self.model.config)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **with_cache(policy_cache),
            use_cache=True,
            output_hidden_states=self.head is not None,
            logits_to_keep=1,
        )
        probs = sampling.probs(outputs.logits[:, -1:])
        first_token = sample(probs[:, 0], sampling.generator)
        state = _DecodeState(
            rows=torch.arange(input_ids.shape[0], device=input_ids.device),
            policy_cache=policy_cache,
            head_cache=None,
            attention_mask=attention_mask,
            next_token=first_token,
            position=attention_mask.sum(dim=-1),
        )
        if self.head is not None:
            state.head_cache = self.head.new_cache()
            state.pending_hidden = self.head.policy_features(outputs.hidden_states)
            state.pending_ids = torch.cat([input_ids[:, 1:], first_token.unsqueeze(-1)], dim=-1)
            state.pending_positions = position_ids + 1
            state.pending_newest = torch.full_like(first_token, input_ids.shape[1] - 1)
        return state, probs

    def _decode_cycle(
        self, state: _DecodeState, k: int, sampling: _SamplingParams
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
        """Drafts up to k tokens, verifies them with one policy forward, rejection-samples and advances the state.

        Returns:
            `tokens` [B, j + 1] and `num_accepted` [B] as from `rejection_sample`, and the processed policy
            distributions [B, j + 1, V] of the verified slots, for the j <= k tokens drafted.
        """
        draft_tokens, draft_probs, confidence = self._draft(state, k, sampling)
        tokens, num_accepted, probs = self._verify(state, draft_tokens, draft_probs, sampling)
        if self.draft_length is not None and confidence is not None:
            self.draft_length.update(confidence, num_accepted)
        return tokens, num_accepted, probs

    def _verify(
        self,
        state: _DecodeState,
        draft_tokens: torch.LongTensor,
        draft_probs: torch.Tensor | None,
        sampling: _SamplingParams,
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
        """Scores `next_token` and the k drafts with one policy forward, rejection-samples and advances the state.

        Args:
            state: The rows' decoding state; its policy cache gains k + 1 slots (fewer after the crop).
            draft_tokens: [B, k] drafts (k = 0 is a plain sampling step).
            draft_probs: [B, k, V] the distributions they were sampled from, or `None` for greedy drafts.
            sampling: Temperature, top-k, top-p and the random generator.

        Returns:
            As `_decode_cycle`.
        """
        batch_size, k, device = draft_tokens.shape[0], draft_tokens.shape[1], draft_tokens.device
        outputs = self.model(
            input_ids=torch.cat([state.next_token.unsqueeze(-1), draft_tokens], dim=-1),
            attention_mask=torch.cat([state.attention_mask, state.attention_mask.new_ones(batch_size, k + 1)], dim=-1),
            position_ids=state.position.unsqueeze(-1) + torch.arange(k + 1, device=device),
            **with_cache(state.policy_cache),
            use_cache=True,
            output_hidden_states=self.head is not None,
        )
        target_probs = sampling.probs(outputs.logits)
        tokens, num_accepted = rejection_sample(draft_tokens, draft_probs, target_probs, sampling.generator)
        pending = self.head.policy_features(outputs.hidden_states) if self.head is not None else None
        state.advance(tokens, num_accepted, pending)
        return tokens, num_accepted, target_probs

    def _draft(
        self, state: _DecodeState, k: int, sampling: _SamplingParams
    ) -> tuple[torch.LongTensor, torch.Tensor | None, torch.Tensor | None]:
        """Runs the head: a catch-up step that yields the first draft, then up to k - 1 recurrent steps.

        The catch-up writes the head's cache slots for the tokens emitted since the last cycle from the policy's
        own hidden states; its output at the newest token gives the first draft. The k - 1 later steps feed the
        head's own output back; their cache slots are dropped afterwards, since the next catch-up rewrites the
        accepted ones from the policy's hidden states. With a draft-length policy, drafting stops after any step
        where the policy judges one more draft not worth its cost; it reads only the head's distributions.

        Returns:
            `draft_tokens` [B, j] for the j <= k tokens drafted; in probabilistic mode `draft_probs` [B, j, V] (else
            `None`); with a draft-length policy, the top probability of each draft distribution [B, j] (else `None`).
        """
        batch_size, device = state.next_token.shape[0], state.next_token.device
        if self.head is None:
            return torch.empty(batch_size, 0, dtype=torch.long, device=device), None, None
        greedy = self.draft_sampling == "greedy" or sampling.temperature == 0
        catch_up = self.head(
            state.pending_hidden,
            state.pending_ids,
            attention_mask=state.attention_mask,
            position_ids=state.pending_positions,
            past_key_values=state.head_cache,
            use_cache=True,
        )
        hidden = catch_up.last_hidden_state[torch.arange(batch_size, device=device), state.pending_newest]
        tokens, probs, confidences = [], [], []
        for step in range(k):
            if step > 0:
                hidden = self.head(
                    hidden.unsqueeze(1),
                    tokens[-1].unsqueeze(-1),
                    attention_mask=torch.cat(
                        [state.attention_mask, state.attention_mask.new_ones(batch_size, step)], dim=-1
                    ),
                    position_ids=(state.position + step).unsqueeze(-1),
                    past_key_values=state.head_cache,
                    use_cache=True,
                ).last_hidden_state[:, 0]
            # Over the draft vocabulary only (the whole vocabulary without one): q is 0 outside it, so processing,
            # sampling and the argmax over D give what they give over the -inf-padded [B, V] logits, for less.
            logits = self.head.compute_draft_logits(hidden)
            if greedy:
                index = logits.argmax(dim=-1)
            else:
                draft_probs = sampling.probs(logits)
                index = sample(draft_probs, sampling.generator)
                probs.append(self.head.to_vocabulary(draft_probs, fill=0.0))
            tokens.append(index if self.head.draft_vocab is None else self.head.draft_vocab[index])
            if self.draft_length is not None:
                confidences.append((draft_probs if not greedy else sampling.probs(logits)).max(dim=-1).values)
                if not self.draft_length.keep_drafting(confidences):
                    break
        if len(tokens) > 1:
            state.head_cache.crop(1 - len(tokens))
        return (
            torch.stack(tokens, dim=1),
            torch.stack(probs, dim=1) if probs else None,
            torch.stack(confidences, dim=1) if confidences else None,
        )

    # ---------------------------------------------------------------------------------------------------- config

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
