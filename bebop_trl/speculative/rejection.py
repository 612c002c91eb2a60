"""Exact verification of drafted tokens by rejection sampling."""

import torch

from .sampling import sample


# Rejection happens with probability equal to the residual mass sum(max(0, p - q)), so where that mass is at the
# level of float32 rounding the event is (almost) impossible and the residual's shape is noise: sample from p there.
_MIN_RESIDUAL_MASS = 1e-6


def rejection_sample(
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Verifies k drafted tokens per row so that the output is distributed exactly as sampling from the target.

    Draft `x` at step j is accepted with probability `min(1, p_j(x) / q_j(x))`. At the first rejection the token is
    drawn from the residual `norm(max(0, p_j - q_j))` and the row stops there; if all k drafts pass, a bonus token is
    drawn from `p_k`.

    Args:
        draft_tokens: [B, k] drafted token ids (k may be 0: then this samples one token from `target_probs`).
        draft_probs: [B, k, V] the distributions the drafts were sampled from, or `None` for greedy drafting
            (q is then one-hot on the draft token, which is accepted with probability `p_j(x)`).
        target_probs: [B, k + 1] x V target distributions: slot j scores draft j, slot k gives the bonus token.
        generator: Random generator on the device of the inputs.

    Returns:
        `(tokens, num_accepted)`: `tokens` [B, k + 1] holds, for row b, the `num_accepted[b]` accepted drafts and
        then the resampled or bonus token; the remaining slots are -1. `num_accepted` is [B] long.
    """
    batch_size, k = draft_tokens.shape
    rows = torch.arange(batch_size, device=draft_tokens.device)
    p_draft = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    uniform = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    # u < p / q without the division: a draft with q = 0 cannot happen, but must not turn into NaN either.
    accepted = uniform * q_draft < p_draft
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)

    next_probs = target_probs[rows, num_accepted]
    if k > 0:
        slot = num_accepted.clamp(max=k - 1)
        slot_draft_probs = None if draft_probs is None else draft_probs[rows, slot]
        residual = _residual_probs(next_probs, slot_draft_probs, draft_tokens[rows, slot])
        next_probs = torch.where((num_accepted < k).unsqueeze(-1), residual, next_probs)

    tokens = torch.full((batch_size, k + 1), -1, dtype=torch.long, device=draft_tokens.device)
    is_accepted = torch.arange(k, device=draft_tokens.device) < num_accepted.unsqueeze(-1)
    tokens[:, :k] = torch.where(is_accepted, draft_tokens, -1)
    tokens[rows, num_accepted] = sample(next_probs, generator)
    return tokens, num_accepted


def _residual_probs(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.LongTensor
) -> torch.Tensor:
    """Unnormalised `max(0, p - q)` [B, V] for the rejected slot, or `p` where that mass is ~0.

    Args:
        target_probs: [B, V] p at the rejected slot.
        draft_probs: [B, V] q at that slot, or `None` for greedy drafting (q one-hot on `draft_tokens`).
        draft_tokens: [B] the rejected drafts.
    """
    if draft_probs is None:
        # With q one-hot on x, max(0, p - q) is p with x removed (p(x) - 1 <= 0).
        residual = target_probs.scatter(-1, draft_tokens.unsqueeze(-1), 0.0)
    else:
        residual = (target_probs - draft_probs).clamp_min(0.0)
    negligible = residual.sum(dim=-1, keepdim=True) <= _MIN_RESIDUAL_MASS
    return torch.where(negligible, target_probs, residual)
