"""The head's teacher-forced loss on a batch, shared by the MTP trainer and the GRPO trainer's online updates."""

import torch

from ..modeling import MTPHead
from ..modeling.teacher_forcing import slot_targets, unroll_teacher_forced
from ..ops import MTPLossOutput, mtp_loss
from ..ops.chunked import policy_log_normalizer


def teacher_forced_head_loss(
    head: MTPHead,
    input_ids: torch.LongTensor,
    policy_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_steps: int,
    loss_type: str,
    temperature: float = 1.0,
    slot_mask: torch.Tensor | None = None,
    token_tile: int | None = None,
    vocab_tile: int | None = None,
) -> MTPLossOutput:
    """Unrolls the head `num_steps` steps along a batch and scores every valid slot against the frozen policy.

    The policy's log-normaliser over its whole vocabulary is computed once per position and gathered per slot (a
    position is the target of up to `num_steps` slots), so the loss sweeps the policy's vocabulary once per position
    rather than once per slot.

    Args:
        head: The MTP head (bound to the policy).
        input_ids: [B, T] token ids.
        policy_hidden: [B, T, H] the policy's final hidden states of `input_ids`.
        attention_mask: [B, T] padding mask.
        num_steps: Draft steps S.
        loss_type: A loss type of [`mtp_loss`][bebop_trl.ops.mtp_loss.mtp_loss].
        temperature: Softmax temperature of both models.
        slot_mask: [S, B(T-1)] slots allowed to count (e.g. only those a rollout drafts), or None for all.
        token_tile: Slots per tile of the loss (None: its default).
        vocab_tile: Vocabulary entries per tile of the loss (None: its default).

    Returns:
        The loss and its per-step acceptance statistics.
    """
    tiling = {k: v for k, v in (("token_tile", token_tile), ("vocab_tile", vocab_tile)) if v is not None}
    slots = unroll_teacher_forced(head, input_ids, policy_hidden, attention_mask, num_steps)
    weight = head.lm_head_weight
    policy_lse = policy_log_normalizer(policy_hidden.detach(), weight, temperature, **tiling)
    is_ce = loss_type == "ce"
    mask = slots.label_mask if is_ce else slots.mask
    if slot_mask is not None:
        mask = mask & slot_mask
    return mtp_loss(
        slots.draft_hidden,
        slots.target_hidden,
        weight,
        loss_type=loss_type,
        mask=mask,
        labels=slots.labels if is_ce else None,
        temperature=temperature,
        draft_lm_head_weight=head.draft_lm_head_weight,
        draft_vocab=head.draft_vocab,
        target_lse=slot_targets(policy_lse, num_steps),
        **tiling,
    )
