"""Exact verification of drafted tokens by rejection sampling, token by token or as a block."""

import torch

from .sampling import sample


REJECTION_SAMPLE_METHODS = ("standard", "block")

# Rejection happens with probability equal to the residual mass sum(max(0, p - q)), so where that mass is at the
# level of float32 rounding the event is (almost) impossible and the residual's shape is noise: sample from p there.
_MIN_RESIDUAL_MASS = 1e-6


def rejection_sample(
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    num_drafts: torch.LongTensor | None = None,
    method: str = "standard",
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Verifies k drafted tokens per row so that the output is distributed exactly as sampling from the target.

    `"standard"` verification accepts draft `x` at step j with probability `min(1, p_j(x) / q_j(x))`. At the first
    rejection the token is drawn from the residual `norm(max(0, p_j - q_j))` and the row stops there; if all the
    row's drafts pass, a bonus token is drawn from the target slot after its last draft.

    `"block"` verification (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR 2025) judges
    the drafts x_1..x_γ of a row as a block (slot i - 1 scores x_i). With weights `w_0 = 1`,
    `w_i = min(1, w_{i-1} p_{i-1}(x_i) / q_{i-1}(x_i))` and residual masses `r_i = sum_x max(0, w_i p_i(x) - q_i(x))`,
    each position i may end the kept block, independently, with probability `h_i = r_i / (r_i + 1 - w_i)`
    (`h_γ = w_γ`). The row keeps its drafts up to the last position τ that may (0 if none may) and draws the next
    token from `norm(max(0, w_τ p_τ - q_τ))`, or from `p_γ` if τ = γ. The output has the same law as with the
    standard method, and keeps at least as many drafts on average (as many with greedy drafts).

    Args:
        draft_tokens: [B, k] drafted token ids (k may be 0: then this samples one token from `target_probs`).
        draft_probs: [B, k, V] the distributions the drafts were sampled from, or `None` for greedy drafting
            (q is then one-hot on the draft token, which is accepted with probability `p_j(x)`).
        target_probs: [B, k + 1] x V target distributions: slot j scores draft j, the slot after a row's last draft
            gives its bonus token.
        generator: Random generator on the device of the inputs.
        num_drafts: [B] number of valid drafts per row, in [0, k]; the drafts after them are padding, which is
            never accepted nor read (its probabilities may be anything). `None` means k for every row.
        method: One of `REJECTION_SAMPLE_METHODS`: `"standard"` (token by token) or `"block"`.

    Returns:
        `(tokens, num_accepted)`: `tokens` [B, k + 1] holds, for row b, the `num_accepted[b]` accepted drafts and
        then the resampled or bonus token; the remaining slots are -1. `num_accepted` is [B] long.

    Raises:
        ValueError: If `method` is unknown, or `num_drafts` is not a [B] integer tensor with values in [0, k].
    """
    if method not in REJECTION_SAMPLE_METHODS:
        raise ValueError(f"method must be one of {REJECTION_SAMPLE_METHODS}, got {method!r}.")
    batch_size, k = draft_tokens.shape
    device = draft_tokens.device
    num_drafts = _validated_num_drafts(num_drafts, batch_size, k, device)
    uniform = torch.rand((batch_size, k), generator=generator, device=target_probs.device)
    if method == "standard":
        num_accepted, next_probs = _verify_tokenwise(draft_tokens, draft_probs, target_probs, num_drafts, uniform)
    else:
        num_accepted, next_probs = _verify_block(draft_tokens, draft_probs, target_probs, num_drafts, uniform)

    rows = torch.arange(batch_size, device=device)
    tokens = torch.full((batch_size, k + 1), -1, dtype=torch.long, device=device)
    is_accepted = torch.arange(k, device=device) < num_accepted.unsqueeze(-1)
    tokens[:, :k] = torch.where(is_accepted, draft_tokens, -1)
    tokens[rows, num_accepted] = sample(next_probs, generator)
    return tokens, num_accepted


def _validated_num_drafts(
    num_drafts: torch.LongTensor | None, batch_size: int, k: int, device: torch.device
) -> torch.LongTensor:
    """`num_drafts` checked against [B] and [0, k], or k for every row if it is `None`."""
    if num_drafts is None:
        return torch.full((batch_size,), k, dtype=torch.long, device=device)
    if num_drafts.shape != (batch_size,) or num_drafts.is_floating_point() or num_drafts.dtype == torch.bool:
        raise ValueError(
            f"num_drafts must be a [B] = [{batch_size}] integer tensor, got {num_drafts.dtype} of shape "
            f"{tuple(num_drafts.shape)}."
        )
    if bool(((num_drafts < 0) | (num_drafts > k)).any()):
        raise ValueError(
            f"num_drafts must be in [0, k] = [0, {k}], got values from {int(num_drafts.min())} to "
            f"{int(num_drafts.max())}."
        )
    return num_drafts


def _draft_token_probs(
    draft_tokens: torch.LongTensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(p_j(x_j), q_j(x_j))` [B, k] each: the target and draft probabilities of every draft."""
    k = draft_tokens.shape[1]
    p_draft = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        return p_draft, torch.ones_like(p_draft)
    return p_draft, draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)


def _verify_tokenwise(
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    num_drafts: torch.LongTensor,
    uniform: torch.Tensor,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Standard verification: `(num_accepted [B], next_probs [B, V])`, the law of the token after the kept drafts.

    Arguments are those of `rejection_sample` (with `num_drafts` given) and `uniform` [B, k], one per draft.
    """
    p_draft, q_draft = _draft_token_probs(draft_tokens, draft_probs, target_probs)
    is_draft = torch.arange(draft_tokens.shape[1], device=draft_tokens.device) < num_drafts.unsqueeze(-1)
    # u < p / q without the division: a draft with q = 0 cannot happen, but must not turn into NaN either.
    accepted = (uniform * q_draft < p_draft) & is_draft
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    return num_accepted, _next_token_probs(num_accepted, num_drafts, draft_tokens, draft_probs, target_probs)


def _verify_block(
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    num_drafts: torch.LongTensor,
    uniform: torch.Tensor,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Block verification: `(num_accepted [B], next_probs [B, V])`, as `_verify_tokenwise`.

    Arguments are those of `rejection_sample` (with `num_drafts` given) and `uniform` [B, k], one per position.
    """
    batch_size, k = draft_tokens.shape
    weights, stop_probs = _block_stop_probs(draft_tokens, draft_probs, target_probs, num_drafts)
    # τ is the last position whose uniform falls below its stop probability h, and position 0 always qualifies. The
    # strict `<` keeps an h of 0 (padding, a negligible residual) from qualifying with u = 0.
    always = torch.ones(batch_size, 1, dtype=torch.bool, device=uniform.device)
    stops = torch.cat([always, uniform < stop_probs], dim=-1)
    num_accepted = (stops * torch.arange(k + 1, device=stops.device)).amax(dim=-1)
    weight = weights[torch.arange(batch_size, device=weights.device), num_accepted]
    next_probs = _next_token_probs(num_accepted, num_drafts, draft_tokens, draft_probs, target_probs, weight)
    return num_accepted, next_probs


def _block_stop_probs(
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    num_drafts: torch.LongTensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block verification's weights and stop probabilities, for every row and draft position.

    Arguments are those of `rejection_sample` (with `num_drafts` given).

    Returns:
        `(weights, stop_probs)`: `weights` [B, k + 1], column i is `w_i = min(1, w_{i-1} p_{i-1}(x_i) /
        q_{i-1}(x_i))` with `w_0 = 1` (arbitrary past the row's drafts); `stop_probs` [B, k], column i - 1 is
        `h_i = r_i / (r_i + 1 - w_i)` before the row's last draft, `w_γ` at it and 0 after it.
    """
    k = draft_tokens.shape[1]
    p_draft, q_draft = _draft_token_probs(draft_tokens, draft_probs, target_probs)
    weights = p_draft.new_ones(p_draft.shape[0], k + 1)
    for j in range(k):
        scaled = weights[:, j] * p_draft[:, j]
        # min(1, w p / q) without dividing where q = 0, which only padding drafts can have.
        weights[:, j + 1] = torch.where(scaled >= q_draft[:, j], 1.0, scaled / q_draft[:, j])

    # r_i in column i - 1; column k - 1 stays 0, as a stop at position k only happens at a row's last draft (h = w).
    mass = torch.zeros_like(p_draft)
    for i in range(1, k):
        slot_draft_probs = None if draft_probs is None else draft_probs[:, i]
        excess = _excess(weights[:, i, None] * target_probs[:, i], slot_draft_probs, draft_tokens[:, i])
        mass[:, i - 1] = excess.sum(dim=-1)
    w = weights[:, 1:]
    # A stop leads to the residual at its position: one of rounding-level mass (0 / 0 included) is ruled out.
    inner = torch.where(mass > _MIN_RESIDUAL_MASS, mass / (mass + 1 - w), 0.0)
    positions = torch.arange(1, k + 1, device=weights.device)
    last = num_drafts.unsqueeze(-1)
    stop_probs = torch.where(positions < last, inner, torch.where(positions == last, w, 0.0))
    return weights, stop_probs


def _next_token_probs(
    num_accepted: torch.LongTensor,
    num_drafts: torch.LongTensor,
    draft_tokens: torch.LongTensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    residual_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised law [B, V] of the token after the accepted drafts: the bonus token's target slot if every
    draft was accepted, else the residual `max(0, w p - q)` at the first slot not accepted.

    The other arguments are those of `rejection_sample` (with `num_drafts` given).

    Args:
        num_accepted: [B] accepted drafts per row.
        residual_weight: [B] the weight w scaling p in the residual (block verification); `None` is 1.
    """
    batch_size, k = draft_tokens.shape
    rows = torch.arange(batch_size, device=draft_tokens.device)
    next_probs = target_probs[rows, num_accepted]
    if k == 0:
        return next_probs
    slot = num_accepted.clamp(max=k - 1)
    slot_draft_probs = None if draft_probs is None else draft_probs[rows, slot]
    scaled = next_probs if residual_weight is None else residual_weight.unsqueeze(-1) * next_probs
    # Where the residual is negligible this is the scaled p, which `sample` draws from as p (it normalises).
    residual = _residual_probs(scaled, slot_draft_probs, draft_tokens[rows, slot])
    return torch.where((num_accepted < num_drafts).unsqueeze(-1), residual, next_probs)


def _residual_probs(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.LongTensor
) -> torch.Tensor:
    """Unnormalised `max(0, p - q)` [B, V] for the rejected slot, or `p` where that mass is ~0.

    Args:
        target_probs: [B, V] p at the rejected slot.
        draft_probs: [B, V] q at that slot, or `None` for greedy drafting (q one-hot on `draft_tokens`).
        draft_tokens: [B] the rejected drafts.
    """
    residual = _excess(target_probs, draft_probs, draft_tokens)
    negligible = residual.sum(dim=-1, keepdim=True) <= _MIN_RESIDUAL_MASS
    return torch.where(negligible, target_probs, residual)


def _excess(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.LongTensor
) -> torch.Tensor:
    """`max(0, p - q)` [B, V], where p may be scaled by a weight <= 1.

    Args:
        target_probs: [B, V] p (or w p).
        draft_probs: [B, V] q, or `None` for greedy drafting (q one-hot on `draft_tokens`).
        draft_tokens: [B] the drafts at that slot.
    """
    if draft_probs is None:
        # With q one-hot on x, max(0, p - q) is p with x removed (p(x) - 1 <= 0).
        return target_probs.scatter(-1, draft_tokens.unsqueeze(-1), 0.0)
    return (target_probs - draft_probs).clamp_min(0.0)
