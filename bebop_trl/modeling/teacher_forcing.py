"""Teacher-forced unrolling of a head along whole sequences: the slots that training and evaluation score."""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model_inputs import positions_from_mask
from .modeling_mtp_head import MTPHead, policy_decoder


IGNORE_INDEX = -100


@dataclass
class UnrolledDraft:
    """Draft and target hidden states of every (draft step, start position) slot of a batch.

    Start position t of sequence b is slot n = b * (T - 1) + t. At draft step j (0-based), the head has read the
    policy's hidden state at t and tokens x_{t+1} .. x_{t+j+1}; it predicts x_{t+j+2}, whose policy distribution
    comes from the policy's hidden state at t+j+1.

    Attributes:
        draft_hidden: [S, N, H] the head's final hidden states.
        target_hidden: [S, N, H] the policy's final hidden states of the same token slots (detached).
        mask: [S, N] True where the slot lies inside the sequence (prefix-closed along S).
        labels: [S, N] the data's token x_{t+j+2}, `IGNORE_INDEX` where the sequence has none.
    """

    draft_hidden: torch.Tensor
    target_hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @property
    def label_mask(self) -> torch.Tensor:
        """[S, N] slots with a data label (for `ce`): `mask` without each sequence's last position."""
        return self.mask & (self.labels != IGNORE_INDEX)


def final_hidden_states(
    policy: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The policy's final hidden states [B, T, H] (after its final norm), without computing any logits.

    Args:
        policy: A causal LM (a PEFT wrapper is fine: its adapters stay active).
        input_ids: [B, T] token ids.
        attention_mask: [B, T] padding mask, left or right padding.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    decoder = policy_decoder(policy)
    if decoder is None:
        raise ValueError(f"{type(policy).__name__} exposes no decoder (get_decoder()); use a causal LM policy.")
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask))
    return out.last_hidden_state


@contextlib.contextmanager
def layer_inputs(policy: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collects the hidden states entering each of the policy's decoder `layers` (layer 0's input is the
    embeddings; layer L's the output of layer L - 1, before any final norm) during a forward pass run inside the
    block, keyed by layer."""
    decoder_layers = policy_decoder(policy).layers
    captured: dict[int, torch.Tensor] = {}

    def recorder(layer: int):
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = args[0] if args else kwargs["hidden_states"]

        return record

    handles = [decoder_layers[layer].register_forward_pre_hook(recorder(layer), with_kwargs=True) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def policy_hidden_states(
    policy: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    aux_layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's final hidden states [B, T, H] and, with `aux_layers`, the hidden states entering those layers
    concatenated in their order [B, T, A * H] (what an EAGLE-3 head reads), from one forward pass.

    Args:
        policy: A causal LM.
        input_ids: [B, T] token ids.
        attention_mask: [B, T] padding mask.
        aux_layers: Layers to capture, or None.
    """
    if not aux_layers:
        return final_hidden_states(policy, input_ids, attention_mask), None
    with layer_inputs(policy, aux_layers) as captured:
        final = final_hidden_states(policy, input_ids, attention_mask)
    return final, torch.cat([captured[layer] for layer in aux_layers], dim=-1)


def completion_token_mask(attention_mask: torch.Tensor, prompt_length: torch.Tensor) -> torch.BoolTensor:
    """[B, T] True at the tokens after each row's first `prompt_length` tokens (left or right padding).

    Args:
        attention_mask: [B, T] padding mask.
        prompt_length: [B] number of prompt tokens per row (0: the whole row counts as completion).
    """
    token_index = attention_mask.long().cumsum(-1) - 1
    return attention_mask.bool() & (token_index >= prompt_length.unsqueeze(-1))


def drafting_slots(is_completion: torch.Tensor, num_steps: int) -> torch.BoolTensor:
    """[S, B(T-1)] the slots of [`unroll_teacher_forced`][bebop_trl.modeling.teacher_forcing.unroll_teacher_forced]
    that the engine drafts in a rollout: starts t whose next token x_{t+1} is a completion token.

    The first draft of a rollout reads the last prompt position and the first sampled token, so a prompt is never
    drafted. The mask is the same for every step, hence prefix-closed.

    Args:
        is_completion: [B, T] completion tokens (see
            [`completion_token_mask`][bebop_trl.modeling.teacher_forcing.completion_token_mask]).
        num_steps: Number of draft steps S.
    """
    return is_completion[:, 1:].flatten().unsqueeze(0).expand(num_steps, -1)


def unroll_teacher_forced(
    head: MTPHead,
    input_ids: torch.LongTensor,
    policy_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_steps: int = 1,
    aux_hidden: torch.Tensor | None = None,
) -> UnrolledDraft:
    """Runs the head `num_steps` draft steps from every position of a batch, with the data's tokens as inputs.

    Each step runs over all start positions at once; step j feeds the head's own hidden states of step j-1 and the
    tokens one further along. Attention and positions are those of the engine's drafting: step j from start t sits
    at position t + j and attends to the step-1 slots of starts up to t and to its own earlier steps, so every slot
    sees what it would see at inference (EAGLE-3's training-time test).

    Args:
        head: The MTP head (bound to the policy).
        input_ids: [B, T] token ids.
        policy_hidden: [B, T, H] the policy's final hidden states of `input_ids` (see
            [`final_hidden_states`][bebop_trl.modeling.teacher_forcing.final_hidden_states]).
        attention_mask: [B, T] padding mask, left or right padding.
        num_steps: Number of draft steps S.
        aux_hidden: [B, T, A * H] the hidden states entering the policy's `head.aux_layers`, which an `eagle3`
            head reads instead of `policy_hidden` (see
            [`policy_hidden_states`][bebop_trl.modeling.teacher_forcing.policy_hidden_states]); the targets stay
            the policy's final hidden states.

    Returns:
        The hidden states (the draft's as its lm_head reads them), validity mask and labels of the S x B(T-1) slots.
    """
    length = input_ids.shape[1]
    if length < 2:
        raise ValueError(f"Sequences need at least 2 tokens to train an MTP head, got length {length}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid_token = attention_mask.bool()
    starts = length - 1
    slot_mask, slot_positions = attention_mask[:, :starts], positions_from_mask(attention_mask)[:, :starts]
    policy_hidden = policy_hidden.detach()

    draft, target, masks, labels = [], [], [], []
    hidden = head.policy_input(policy_hidden[:, :starts], None if aux_hidden is None else aux_hidden[:, :starts])
    inside = valid_token[:, :starts]
    cache = head.new_cache()
    for j in range(1, num_steps + 1):
        hidden = head(
            hidden,
            _ahead(input_ids, j, 0),
            attention_mask=_draft_attention_mask(slot_mask.bool(), j, head.fc.weight.dtype),
            position_ids=slot_positions + j,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        inside = inside & _ahead(valid_token, j, False)
        draft.append(head.output_norm(hidden))
        target.append(_ahead(policy_hidden, j, 0.0))
        masks.append(inside)
        next_token_valid = _ahead(valid_token, j + 1, False)
        labels.append(torch.where(inside & next_token_valid, _ahead(input_ids, j + 1, 0), IGNORE_INDEX))

    def flat(steps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(steps).flatten(1, 2)

    return UnrolledDraft(flat(draft), flat(target), flat(masks), flat(labels))


def slot_targets(values: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[S, B(T-1)] the per-position `values` [B, T] of the policy position each slot of
    [`unroll_teacher_forced`][bebop_trl.modeling.teacher_forcing.unroll_teacher_forced] targets: `values[b, t + j]`
    at draft step j (1-based) from start t, 0 past the end of the sequence (such slots are masked).

    Per-position quantities of the policy (its log-normaliser, for one) are thereby computed once per position, while
    a position is the target of up to S slots.
    """
    return torch.stack([_ahead(values, j, 0) for j in range(1, num_steps + 1)]).flatten(1, 2)


def _ahead(x: torch.Tensor, j: int, fill) -> torch.Tensor:
    """x[:, t + j] for the T - 1 start positions t of x [B, T, ...], padded with `fill` past the end of the
    sequence."""
    starts = x.shape[1] - 1
    shifted = x[:, j : j + starts]
    pad = starts - shifted.shape[1]
    if pad == 0:
        return shifted
    pad_shape = (0, 0, 0, pad) if x.dim() == 3 else (0, pad)
    return F.pad(shifted, pad_shape, value=fill)


def _draft_attention_mask(valid_start: torch.Tensor, step: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T', step * T'] mask of draft step `step` over the head's cache of steps 1 .. `step`.

    When the engine drafts step j from start t, the head's cache holds the step-1 slots of every start up to t
    (written from the policy's hidden states) and this draft's own steps 1 .. j - 1. Training step j attends to the
    same keys: causally to the step-1 slots, and to the same start's slot of each later step.
    """
    batch, starts = valid_start.shape
    index = torch.arange(starts, device=valid_start.device)
    first_step = (index[None, :] <= index[:, None]) & valid_start[:, None, :]
    same_start = torch.eye(starts, dtype=torch.bool, device=valid_start.device).expand(batch, starts, starts)
    allowed = torch.cat([first_step] + [same_start] * (step - 1), dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid_start.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
