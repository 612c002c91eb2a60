"""The head's teacher-forced loss on a batch, shared by the MTP trainer and the GRPO trainer's online updates."""

import torch

from ..modeling import MTPHead
from ..modeling.teacher_forcing import slot_targets, unroll_teacher_forced
from ..ops import MTPLossOutput, mtp_loss
from ..ops.chunked import policy_log_normalizer as log_normalizer


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
    aux_hidden: torch.Tensor | None = None,
    kl_scale: float = 1.0,
    kl_decay: float = 1.0,
    policy_log_normalizer: torch.Tensor | None = None,
) -> MTPLossOutput:
    """Unrolls the head `num_steps` steps along a batch and scores every valid slot against the frozen policy.

    For a head with a draft vocabulary D, the policy's log-normaliser over its whole vocabulary is computed once per
    real position and gathered per slot (a position is the target of up to `num_steps` slots), so the loss sweeps
    the policy's whole vocabulary once per position and only D per slot. A full-vocabulary head compares q with p
    over the whole vocabulary at every slot anyway, so there the normaliser comes with that sweep. A corpus may store
    the normaliser (`policy_log_normalizer`); at temperature 1, the temperature it is stored at, training then never
    sweeps the policy's vocabulary.

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
        aux_hidden: [B, T, A * H] the hidden states entering the policy's `head.aux_layers` (`eagle3` heads).
        kl_scale: KL weight of the LK `"lambda"` losses at zero acceptance.
        kl_decay: Decay of that weight with the acceptance.
        policy_log_normalizer: [B, T] the log-sum-exp of the policy's logits at temperature 1 over its whole
            vocabulary, per position (as a corpus stores it), or None to compute it where needed.

    Returns:
        The loss and its per-step acceptance statistics.
    """
    tiling = {k: v for k, v in (("token_tile", token_tile), ("vocab_tile", vocab_tile)) if v is not None}
    slots = unroll_teacher_forced(head, input_ids, policy_hidden, attention_mask, num_steps, aux_hidden)
    weight = head.lm_head_weight
    target_lse = None
    if head.draft_vocab is not None:
        if policy_log_normalizer is not None and temperature == 1.0:
            per_position = policy_log_normalizer.float()
        else:
            real = attention_mask.bool()
            values = log_normalizer(policy_hidden.detach()[real], weight, temperature, **tiling)
            per_position = values.new_zeros(real.shape).masked_scatter(real, values)
        target_lse = slot_targets(per_position, num_steps)
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
        target_lse=target_lse,
        kl_scale=kl_scale,
        kl_decay=kl_decay,
        **tiling,
    )
