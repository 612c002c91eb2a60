"""Naive reference for [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss]: full logits and plain autograd.

It materialises both models' [S, N, V] logits and lets autograd differentiate through softmax, so it needs
memory proportional to S * N * V. It exists to check the tiled implementation and to benchmark against it, and
shares nothing with it but the input checks and the output type.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_mtp_loss import LossType, MTPLossOutput, draft_indices, validate_inputs


def mtp_loss_reference(
    draft_hidden: Tensor,
    target_hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    loss_type: LossType = "e2e_tv",
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    draft_lm_head_weight: Tensor | None = None,
    draft_vocab: Tensor | None = None,
    kl_scale: float = 1.0,
    kl_decay: float = 1.0,
) -> MTPLossOutput:
    """Same contract as [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss], minus the tiling and backend options.

    With a draft vocabulary, the head's distribution is scattered into a full-vocabulary `q` that is 0 outside it,
    and compared with the policy's full-vocabulary `p` as it is.

    Args:
        draft_hidden: [S, N, H] the head's final hidden states.
        target_hidden: [S, N, H] the policy's final hidden states for the same slots (no gradient).
        lm_head_weight: [V, H] the policy's lm_head weight (no gradient).
        loss_type: A loss type of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss].
        mask: [S, N] bool prefix-closed validity mask; `None` means all valid.
        labels: [S, N] token ids, required for `"ce"`.
        temperature: Softmax temperature.
        draft_lm_head_weight: [|D|, H] the head's lm_head rows over its draft vocabulary (no gradient), or None.
        draft_vocab: [|D|] target ids of those rows.
        kl_scale: KL weight of the `"lambda"` forms at zero acceptance.
        kl_decay: Decay of that weight with the acceptance.

    Returns:
        The loss and acceptance statistics, computed in float32 (float64 for float64 inputs).
    """
    mask = validate_inputs(
        draft_hidden,
        target_hidden,
        lm_head_weight,
        loss_type,
        mask,
        labels,
        temperature,
        draft_lm_head_weight=draft_lm_head_weight,
        draft_vocab=draft_vocab,
        kl_scale=kl_scale,
        kl_decay=kl_decay,
    )
    dtype = torch.promote_types(draft_hidden.dtype, torch.float32)
    weight = lm_head_weight.detach().to(dtype)
    target_logits = target_hidden.detach().to(dtype) @ weight.T / temperature
    log_p = F.log_softmax(target_logits, dim=-1)
    p = log_p.exp()
    counted = mask
    if draft_vocab is None:
        log_q = F.log_softmax(draft_hidden.to(dtype) @ weight.T / temperature, dim=-1)
        q_full = log_q.exp()
        log_p_draft = log_p
        # Over the whole vocabulary, p renormalised is p itself.
        log_p_renormalised = log_p
        draft_labels = labels
    else:
        draft_weight = draft_lm_head_weight.detach().to(dtype)
        log_q = F.log_softmax(draft_hidden.to(dtype) @ draft_weight.T / temperature, dim=-1)
        q_full = torch.zeros_like(p).index_copy(-1, draft_vocab, log_q.exp())
        log_p_draft = log_p[..., draft_vocab]
        log_p_renormalised = F.log_softmax(target_logits[..., draft_vocab], dim=-1)
        draft_labels = None
        if loss_type == "ce":
            draft_labels, in_draft_vocab = draft_indices(torch.where(mask, labels, 0), draft_vocab, len(weight))
            counted = mask & in_draft_vocab
    q = log_q.exp()
    tv = 0.5 * (p - q_full).abs().sum(dim=-1)
    outside = 1 - p[..., draft_vocab].sum(dim=-1) if draft_vocab is not None else torch.zeros_like(tv)

    valid = mask.to(dtype)
    num_valid = valid.sum()
    accepted = _accepted_lengths(tv, mask)
    # Forward KL against p renormalised over the draft vocabulary (p itself without one).
    kl = (log_p_renormalised.exp() * (log_p_renormalised - log_q)).sum(dim=-1)
    steps = [step for step in range(tv.shape[0]) if mask[step].any()]
    step_tv = torch.stack([tv[step][mask[step]].mean() for step in steps])
    step_kl = torch.stack([kl[step][mask[step]].mean() for step in steps])
    chain = accepted.sum() / num_valid
    tiny = torch.finfo(dtype).tiny
    if loss_type == "e2e_tv":
        loss = 1 - chain
    elif loss_type == "e2e_lk_alpha":
        loss = -torch.log(torch.clamp(chain, min=tiny))
    elif loss_type == "e2e_lk_lambda":
        weight = kl_scale * torch.exp(-kl_decay * chain.detach())
        loss = weight * kl[mask].mean() + (1 - weight) * (1 - chain)
    elif loss_type == "lk_alpha":
        loss = -torch.log(torch.clamp(1 - step_tv, min=tiny)).mean()
    elif loss_type == "lk_lambda":
        weight = kl_scale * torch.exp(-kl_decay * (1 - step_tv.detach()))
        loss = (weight * step_kl + (1 - weight) * step_tv).mean()
    else:
        if loss_type == "ce":
            per_slot = -log_q.gather(-1, torch.where(counted, draft_labels, 0).unsqueeze(-1)).squeeze(-1)
        elif loss_type == "kl":
            per_slot = kl
        elif loss_type == "rkl":
            per_slot = (q * (log_q - log_p_draft)).sum(dim=-1)
        else:
            per_slot = tv
        loss = torch.where(counted, per_slot, 0.0).sum() / counted.sum().clamp_min(1)

    with torch.no_grad():
        step_tv = torch.stack([tv[step][mask[step]].mean() for step in range(tv.shape[0])])
        step_outside = torch.stack([outside[step][mask[step]].mean() for step in range(tv.shape[0])])
        expected_accepted_length = accepted[mask.any(dim=0)].mean()

    return MTPLossOutput(
        loss=loss,
        tv=step_tv,
        acceptance=1 - step_tv,
        expected_accepted_length=expected_accepted_length,
        target_mass_outside_draft_vocab=step_outside,
    )


def _accepted_lengths(tv: Tensor, mask: Tensor) -> Tensor:
    """[N] expected accepted draft length per start position, walking the draft steps one by one."""
    survival = torch.ones_like(tv[0])
    accepted = torch.zeros_like(tv[0])
    for step in range(tv.shape[0]):
        # A drafted prefix survives a valid step with probability 1 - TV; invalid steps are skipped.
        survival = survival * torch.where(mask[step], 1 - tv[step], 1.0)
        accepted = accepted + torch.where(mask[step], survival, 0.0)
    return accepted
