"""Tiled engine behind [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss]: per-slot divergences without [slots, V] logits.

The engine owns the tiling, the two vocabulary sweeps and the gradient bookkeeping. Each divergence only states,
per logits tile, the statistic it accumulates and the coefficients `c` whose products `c @ W` build its gradient,
plus how those pieces combine once the sweep is done. The element-wise tile math sits behind `TileMath`, which
PyTorch implements here and Triton in `triton_kernels.py`; the matmuls are PyTorch's in both.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class Workspace:
    """Tile-sized scratch buffers, allocated once per call and reused for every tile.

    On CPU, a fresh allocation of a multi-megabyte tile costs more than the arithmetic on it (the pages are faulted
    in anew each time), so the tile math writes into these buffers with in-place and `out=` ops instead.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def tile(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous buffer named `name` of `shape`, with the dtype and device of `like`; content undefined."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)


class TileMath(Protocol):
    """Element-wise math on one [t, v] tile of draft logits `zq` and policy logits `zp`."""

    def online_lse(self, zq: Tensor, zp: Tensor, state: Tensor, workspace: Workspace) -> None:
        """Folds a tile into the running log-sum-exp of both models, without modifying the tiles.

        Args:
            zq: [t, v] draft logits.
            zp: [t, v] policy logits.
            state: [4, t] running max and sum of `exp(z - max)` of `zq`, then of `zp`; updated in place.
            workspace: Scratch buffers.
        """
        ...

    def divergence(
        self,
        loss_type: str,
        zq: Tensor,
        zp: Tensor,
        lse_q: Tensor,
        lse_p: Tensor,
        acc: Tensor,
        need_grad: bool,
        workspace: Workspace,
    ) -> tuple[Tensor, ...]:
        """Accumulates a tile's statistics and returns its gradient coefficients.

        Args:
            loss_type: The divergence, a key of `DIVERGENCES`.
            zq: [t, v] draft logits; overwritten.
            zp: [t, v] policy logits; overwritten.
            lse_q: [t] final log-sum-exp of the draft logits.
            lse_p: [t] final log-sum-exp of the policy logits.
            acc: [1 + stats, t] running TV distance `0.5 * sum_v |q_v - p_v|` and running statistics of the
                divergence (`DIVERGENCES[loss_type].stats` rows); updated in place.
            need_grad: Whether to return the gradient coefficients.
            workspace: Scratch buffers.

        Returns:
            `DIVERGENCES[loss_type].grad_terms` [t, v] coefficient tiles if `need_grad`, else nothing. They may
            alias `zq`, `zp` or workspace buffers, so they are only valid until the next call.
        """
        ...


@dataclass(frozen=True)
class Divergence:
    """How one loss turns a tile into statistics and gradient coefficients, and those into its value and gradient.

    Attributes:
        grad_terms: Number of coefficient tiles `c` per logits tile, i.e. of [t, H] accumulators `sum_v c_v W_v`.
        tile: PyTorch tile math `(log_q, log_p, acc, need_grad, workspace) -> coefficients`, with the log-softmax
            tiles (overwritten) and `acc` as in `TileMath.divergence`.
        finish: `(tv, stats, terms, lse_q, log_mass, h, weight, labels) -> (value, grad)`, with `stats` the
            [stats, t] accumulated statistics, `terms` the [k, t, H] accumulators (None without gradient),
            `log_mass` the log of the policy's probability mass on the draft vocabulary (0 without one), `h` the
            temperature-scaled hidden states, `weight` the draft's lm_head weight and `grad` the derivative of
            `value` with respect to `h`: [t] and [t, H], or [t, C] and [t, C, H] for a divergence of C components.
        stats: Number of per-slot statistics the tiles accumulate besides the TV.
        components: Number of per-slot values (each with its own gradient): 1, or 2 for the (KL, TV) pair that the
            LK "lambda" losses blend with weights known only once every slot is swept.
    """

    grad_terms: int
    tile: Callable[[Tensor, Tensor, Tensor, bool, Workspace], tuple[Tensor, ...]]
    finish: Callable[..., tuple[Tensor, Tensor | None]]
    stats: int = 1
    components: int = 1


# Divergence gradients with respect to the draft logits z, with q = softmax(z), p fixed:
#   TV:  -q_v (1[q_v <= p_v] - S), S = sum_u 1[q_u <= p_u] q_u  ->  S * (q @ W) - (q 1[q <= p]) @ W
#   KL(p || q):  q - p
#   KL(q || p):  q_v (log q_v - log p_v - KL(q || p))  ->  (q log(q/p)) @ W - KL * (q @ W)
#   CE:  q - onehot(label)  ->  q @ W - W[label]
# TV's S and the reverse KL are only known once the sweep is done, hence the second accumulator `q @ W` for both.
# The (KL, TV) pair keeps p @ W, (q 1[q <= p]) @ W and q @ W, from which either gradient follows.
# With a draft vocabulary D, q lives on D and p is the policy's full-vocabulary distribution restricted to D, so
# sum_D p = P(D) <= 1. TV, reverse KL and CE keep their formulas (q is 0 outside D, and TV adds the constant
# 0.5 * (1 - P(D)) once the sweep is done). The forward KL is infinite against p itself; it is taken against p
# renormalised over D, p_D = p / P(D):
#   KL(p_D || q):  q - p / P(D)  ->  q @ W - (p @ W) / P(D), with P(D) only known at the end: two accumulators.


def _add_tv(q: Tensor, p: Tensor, tv: Tensor) -> Tensor:
    """Adds the tile's share of `0.5 * sum_v |p_v - q_v|` to `tv` and returns `p - q`, computed in place of `p`."""
    diff = p.sub_(q)
    tv += 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=1)
    return diff


# The PyTorch tile functions work in place in the two logits tiles and at most one scratch tile: on CPU the
# memory of a tile and the time to page it in on every reuse are both significant.


def _tv_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    q = log_q.exp_()
    p_minus_q = _add_tv(q, log_p.exp_(), acc[0])
    if not need_grad:
        return ()
    # A float-valued comparison: bool tiles are several times slower to produce and consume on CPU.
    q_below_p = p_minus_q.ge_(0).mul_(q)
    acc[1] += q_below_p.sum(dim=1)
    return q_below_p, q


def _tv_finish(tv: Tensor, stats: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return tv, None if terms is None else stats[0, :, None] * terms[1] - terms[0]


def _kl_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    log_ratio = torch.sub(log_p, log_q, out=workspace.tile("scratch", log_q.shape, log_q))
    q, p = log_q.exp_(), log_p.exp_()
    # Where p underflows to 0 its term is 0: log q is always finite.
    acc[1] += log_ratio.mul_(p).sum(dim=1)
    p_minus_q = _add_tv(q, p, acc[0])
    return (p_minus_q.neg_(),) if need_grad else ()


def _kl_finish(tv: Tensor, stats: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return stats[0], None if terms is None else terms[0]


def _rkl_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    q_log_ratio = torch.sub(log_q, log_p, out=workspace.tile("scratch", log_q.shape, log_q))
    q = log_q.exp_()
    acc[1] += q_log_ratio.mul_(q).sum(dim=1)
    _add_tv(q, log_p.exp_(), acc[0])
    return (q_log_ratio, q) if need_grad else ()


def _rkl_finish(tv: Tensor, stats: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return stats[0], None if terms is None else terms[0] - stats[0, :, None] * terms[1]


def _draft_vocab_kl_tile(
    log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace
) -> tuple[Tensor, ...]:
    log_ratio = torch.sub(log_p, log_q, out=workspace.tile("scratch", log_q.shape, log_q))
    q, p = log_q.exp_(), log_p.exp_()
    acc[1] += log_ratio.mul_(p).sum(dim=1)
    # p itself is a gradient coefficient here, so the difference goes to the scratch tile instead of over p.
    acc[0] += 0.5 * torch.linalg.vector_norm(torch.sub(p, q, out=log_ratio), ord=1, dim=1)
    return (q, p) if need_grad else ()


def _draft_vocab_kl_finish(
    tv: Tensor, stats: Tensor, terms: Tensor | None, lse_q: Tensor, log_mass: Tensor, *_: Any
) -> tuple[Tensor, Tensor | None]:
    kl, mass = _renormalised_kl(stats[0], log_mass)
    return kl, None if terms is None else terms[0] - terms[1] / mass[:, None]


def _renormalised_kl(stat: Tensor, log_mass: Tensor) -> tuple[Tensor, Tensor]:
    """`KL(p_D || q)` from `stat = sum_D p log(p / q)`, and `P(D)` (1 without a draft vocabulary, where the KL is
    `stat` itself)."""
    # stat = P(D) * (KL(p_D || q) + log P(D)). The clamp only matters where P(D) underflows, and there p, hence stat
    # and p @ W, are 0 as well.
    mass = log_mass.exp().clamp_min(torch.finfo(log_mass.dtype).tiny)
    return stat / mass - log_mass, mass


def _kl_tv_tile(
    log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace
) -> tuple[Tensor, ...]:
    log_ratio = torch.sub(log_p, log_q, out=workspace.tile("scratch", log_q.shape, log_q))
    q, p = log_q.exp_(), log_p.exp_()
    acc[1] += log_ratio.mul_(p).sum(dim=1)
    # p is a gradient coefficient, so the difference goes to the scratch tile instead of over p.
    p_minus_q = torch.sub(p, q, out=log_ratio)
    acc[0] += 0.5 * torch.linalg.vector_norm(p_minus_q, ord=1, dim=1)
    if not need_grad:
        return ()
    q_below_p = p_minus_q.ge_(0).mul_(q)
    acc[2] += q_below_p.sum(dim=1)
    return p, q_below_p, q


def _kl_tv_finish(
    tv: Tensor, stats: Tensor, terms: Tensor | None, lse_q: Tensor, log_mass: Tensor, *_: Any
) -> tuple[Tensor, Tensor | None]:
    # The KL is against p renormalised over the draft vocabulary, as for "kl"; the TV against p itself.
    kl, mass = _renormalised_kl(stats[0], log_mass)
    value = torch.stack([kl, tv], dim=1)
    if terms is None:
        return value, None
    grad_kl = terms[2] - terms[0] / mass[:, None]
    grad_tv = stats[1, :, None] * terms[2] - terms[1]
    return value, torch.stack([grad_kl, grad_tv], dim=1)


def _ce_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    q = log_q.exp_()
    _add_tv(q, log_p.exp_(), acc[0])
    return (q,) if need_grad else ()


def _ce_finish(
    tv: Tensor,
    stats: Tensor,
    terms: Tensor | None,
    lse_q: Tensor,
    log_mass: Tensor,
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
) -> tuple[Tensor, Tensor | None]:
    # The label's logit and one-hot gradient are one row of W per slot, cheaper to gather than to find in tiles.
    label_rows = weight[labels].to(h.dtype)
    value = lse_q - (h * label_rows).sum(dim=1)
    return value, None if terms is None else terms[0] - label_rows


# The tile math of the forward KL with a draft vocabulary; every other loss keeps its own (see above).
DRAFT_VOCAB_KL = "kl_draft_vocab"
# The forward KL (against p_D with a draft vocabulary) and the TV of every slot, each with its gradient.
KL_AND_TV = "kl_tv"

DIVERGENCES: dict[str, Divergence] = {
    "ce": Divergence(1, _ce_tile, _ce_finish),
    "kl": Divergence(1, _kl_tile, _kl_finish),
    "rkl": Divergence(2, _rkl_tile, _rkl_finish),
    "tv": Divergence(2, _tv_tile, _tv_finish),
    DRAFT_VOCAB_KL: Divergence(2, _draft_vocab_kl_tile, _draft_vocab_kl_finish),
    KL_AND_TV: Divergence(3, _kl_tv_tile, _kl_tv_finish, stats=2, components=2),
}


class TorchTileMath:
    """`TileMath` in plain PyTorch, for every device."""

    def online_lse(self, zq: Tensor, zp: Tensor, state: Tensor, workspace: Workspace) -> None:
        fold_lse(zq, state[0:2], workspace)
        fold_lse(zp, state[2:4], workspace)

    def divergence(
        self,
        loss_type: str,
        zq: Tensor,
        zp: Tensor,
        lse_q: Tensor,
        lse_p: Tensor,
        acc: Tensor,
        need_grad: bool,
        workspace: Workspace,
    ) -> tuple[Tensor, ...]:
        log_q = zq.sub_(lse_q[:, None])
        log_p = zp.sub_(lse_p[:, None])
        return DIVERGENCES[loss_type].tile(log_q, log_p, acc, need_grad, workspace)


def fold_lse(z: Tensor, state: Tensor, workspace: Workspace) -> None:
    """Folds a [t, v] logits tile into a running log-sum-exp `state` [2, t] (max, sum of `exp(z - max)`)."""
    running_max, running_sum = state
    new_max = torch.maximum(running_max, z.amax(dim=1))
    shifted = torch.sub(z, new_max[:, None], out=workspace.tile("scratch", z.shape, z))
    running_sum.mul_((running_max - new_max).exp_()).add_(shifted.exp_().sum(dim=1))
    running_max.copy_(new_max)


@torch.no_grad()
def policy_log_normalizer(
    hidden: Tensor, weight: Tensor, temperature: float = 1.0, token_tile: int = 512, vocab_tile: int = 65536
) -> Tensor:
    """The log-sum-exp of the policy's logits `hidden @ weight^T / temperature` over the whole vocabulary, tile by
    tile, without materialising the logits.

    A policy position is the target of up to S draft slots (one per draft step), so computing its normaliser once
    here and passing it to [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] as `target_lse` spares the loss one sweep
    of the whole vocabulary per slot.

    Args:
        hidden: [..., H] the policy's final hidden states.
        weight: [V, H] its lm_head weight.
        temperature: Softmax temperature.
        token_tile: Positions per tile.
        vocab_tile: Maximum vocabulary entries per tile.

    Returns:
        [...] float32 (float64 for float64 inputs) log-normalisers.
    """
    dtype = compute_dtype(hidden, weight)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat.new_empty(flat.shape[0], dtype=dtype)
    workspace = Workspace()
    for start in range(0, flat.shape[0], token_tile):
        h = flat[start : start + token_tile].to(dtype) / temperature
        out[start : start + token_tile] = _vocabulary_lse(h, weight, vocab_tile, workspace)
    return out.view(hidden.shape[:-1])


def _vocabulary_lse(h: Tensor, weight: Tensor, vocab_tile: int, workspace: Workspace) -> Tensor:
    """[t] log-sum-exp of `h @ weight^T` over the whole vocabulary, in tiles of at most `vocab_tile` rows (`h` is
    already scaled by 1/T and in the tile-math dtype)."""
    starts, width = _vocab_tiles(weight.shape[0], vocab_tile)
    state = h.new_zeros(2, h.shape[0])
    state[0] = float("-inf")
    for vocab_start in starts:
        w = weight[vocab_start : vocab_start + width]
        w = w if w.dtype == h.dtype else workspace.tile("weight", w.shape, h).copy_(w)
        fold_lse(torch.mm(h, w.T, out=workspace.tile("zp", (h.shape[0], w.shape[0]), h)), state, workspace)
    return state[0] + state[1].log()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of the tile math: float32, or float64 if any input is float64."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def tiled_divergence(
    draft: Tensor,
    target: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    *,
    loss_type: str,
    temperature: float,
    token_tile: int,
    vocab_tile: int,
    need_grad: bool,
    tile_math: TileMath,
    draft_weight: Tensor | None = None,
    draft_vocab: Tensor | None = None,
    target_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-slot divergence, TV distance and gradient, sweeping the draft's vocabulary twice per tile of slots.

    The first sweep accumulates both models' log-sum-exp online. TV compares normalised probabilities, so
    everything else waits for the second sweep, which recomputes the logits tiles and accumulates the TV, the
    loss's statistic and, if `need_grad`, the gradient products `c @ W`. The second sweep runs backwards over the
    vocabulary, so its first tile is the one the first sweep ended on and is not recomputed.

    With a draft vocabulary D, the draft's logits come from `draft_weight` over D only, and the policy's over D
    from the rows `weight[draft_vocab]`, gathered tile by tile. The policy's normaliser still runs over the whole
    vocabulary, in one more sweep of the policy alone before the first, so that `p` is the policy's distribution
    itself and the mass it puts outside D counts as rejected.

    With `target_lse`, the policy's whole-vocabulary log-normaliser of every slot is known beforehand (computed once
    per position by [`policy_log_normalizer`][bebop_trl.ops.chunked.policy_log_normalizer], while a position is the
    target of up to S slots), so the first sweep folds the draft's logits alone, and with a draft vocabulary the
    sweep of the policy over the whole vocabulary is skipped.

    Args:
        draft: [M, H] the head's hidden states of the valid slots.
        target: [M, H] the policy's hidden states of the same slots.
        weight: [V, H] the policy's lm_head weight (also the draft's without a draft vocabulary).
        labels: [M] label indices into the draft's vocabulary (`"ce"` only).
        loss_type: A key of `DIVERGENCES` other than `DRAFT_VOCAB_KL` (which `"kl"` becomes with a draft
            vocabulary).
        temperature: Softmax temperature.
        token_tile: Slots per tile.
        vocab_tile: Maximum vocabulary entries per tile.
        need_grad: Whether to compute the gradient.
        tile_math: Element-wise tile implementation.
        draft_weight: [|D|, H] the draft's lm_head weight over its vocabulary D, or None for the full vocabulary.
        draft_vocab: [|D|] the target token ids of D's rows, sorted; given with `draft_weight`.
        target_lse: [M] the log-sum-exp of each slot's policy logits `target @ weight^T / temperature` over the whole
            vocabulary, or None to compute it here.

    Returns:
        The [M] divergence ([M, C] for a divergence of C components), the [M] TV distance, the [M] policy mass
        outside the draft vocabulary (0 without one) and, if `need_grad`, the [M, H] ([M, C, H]) gradient of each
        slot's divergence with respect to its `draft` row, all in float32 (float64 for float64 inputs).
    """
    restricted = draft_vocab is not None
    divergence_name = DRAFT_VOCAB_KL if restricted and loss_type == "kl" else loss_type
    divergence = DIVERGENCES[divergence_name]
    draft_weight = draft_weight if restricted else weight
    dtype = compute_dtype(draft, target, weight, draft_weight)
    num_slots, hidden_size = draft.shape
    draft_starts, draft_tile = _vocab_tiles(draft_weight.shape[0], vocab_tile)
    components = (divergence.components,) if divergence.components > 1 else ()
    value = draft.new_empty(num_slots, *components, dtype=dtype)
    tv = draft.new_empty(num_slots, dtype=dtype)
    outside = torch.zeros_like(tv)
    grad = draft.new_empty(num_slots, *components, hidden_size, dtype=dtype) if need_grad else None
    workspace = Workspace()
    # With a known normaliser and no draft vocabulary, the first sweep needs the draft's logits only. A draft
    # vocabulary still needs the policy's logits over D, for the mass P(D) it puts there (a cheap sweep over D).
    policy_in_first_sweep = restricted or target_lse is None

    def in_dtype(rows: Tensor, name: str) -> Tensor:
        return rows if rows.dtype == dtype else workspace.tile(name, rows.shape, value).copy_(rows)

    def weight_tiles(vocab_start: int) -> tuple[Tensor, Tensor]:
        """The draft's and the policy's lm_head rows of the draft vocabulary tile starting at `vocab_start`."""
        w = in_dtype(draft_weight[vocab_start : vocab_start + draft_tile], "weight")
        if not restricted:
            return w, w
        ids = draft_vocab[vocab_start : vocab_start + draft_tile]
        rows = torch.index_select(weight, 0, ids, out=workspace.tile("gathered", (len(ids), hidden_size), weight))
        return w, in_dtype(rows, "target_weight")

    def logits(h: Tensor, w: Tensor, name: str) -> Tensor:
        return torch.mm(h, w.T, out=workspace.tile(name, (h.shape[0], w.shape[0]), h))

    for start in range(0, num_slots, token_tile):
        rows = slice(start, start + token_tile)
        # 1/T is folded into the small [t, H] operands rather than into every [t, v] logits tile.
        hq = draft[rows].to(dtype) / temperature
        hp = target[rows].to(dtype) / temperature
        known_lse = None if target_lse is None else target_lse[rows].to(dtype)
        if restricted and known_lse is None:
            # Before the draft sweep, whose last logits tiles the second sweep reuses.
            known_lse = _vocabulary_lse(hp, weight, vocab_tile, workspace)
        state = hq.new_zeros(4, hq.shape[0])
        state[0::2] = float("-inf")
        for vocab_start in draft_starts:
            wq, wp = weight_tiles(vocab_start)
            zq = logits(hq, wq, "zq")
            if policy_in_first_sweep:
                zp = logits(hp, wp, "zp")
                tile_math.online_lse(zq, zp, state, workspace)
            else:
                fold_lse(zq, state[0:2], workspace)
        lse_q = state[0] + state[1].log()
        lse_p = state[2] + state[3].log()
        log_mass = torch.zeros_like(lse_p)
        if restricted:
            # The first sweep's lse_p covers D only. Rounding may put it a hair above the whole vocabulary's when D
            # is all of it.
            log_mass = (lse_p - known_lse).clamp_max(0)
        if known_lse is not None:
            lse_p = known_lse

        acc = hq.new_zeros(1 + divergence.stats, hq.shape[0])
        terms = hq.new_zeros(divergence.grad_terms, *hq.shape) if need_grad else None
        for vocab_start in reversed(draft_starts):
            if vocab_start != draft_starts[-1]:
                wq, wp = weight_tiles(vocab_start)
                zq, zp = logits(hq, wq, "zq"), logits(hp, wp, "zp")
            elif not policy_in_first_sweep:
                zp = logits(hp, wp, "zp")
            coefficients = tile_math.divergence(divergence_name, zq, zp, lse_q, lse_p, acc, need_grad, workspace)
            for term, coefficient in zip(terms if need_grad else (), coefficients, strict=True):
                term.addmm_(coefficient, wq)

        if restricted:
            # Outside D, q is 0 and |p - q| = p: that half of the TV sum is the mass the sweep never visited.
            outside[rows] = -torch.expm1(log_mass)
            acc[0] += 0.5 * outside[rows]
        tile_labels = labels[rows] if labels is not None else None
        value[rows], tile_grad = divergence.finish(
            acc[0], acc[1:], terms, lse_q, log_mass, hq, draft_weight, tile_labels
        )
        tv[rows] = acc[0]
        if need_grad:
            # Chain rule through z = h W^T / T.
            grad[rows] = tile_grad / temperature
    return value, tv, outside, grad


def _vocab_tiles(vocab_size: int, vocab_tile: int) -> tuple[range, int]:
    """Tile starts and width that split `vocab_size` entries into equal tiles of at most `vocab_tile`.

    Equal tiles: as many sweeps as `vocab_tile` implies, but no small remainder tile, so the tile that the second
    sweep reuses from the first is a full one.
    """
    vocab_tile = -(-vocab_size // -(-vocab_size // vocab_tile))
    return range(0, vocab_size, vocab_tile), vocab_tile


class MTPDivergenceFunction(torch.autograd.Function):
    """Per-slot divergence, TV distance and policy mass outside the draft vocabulary of the valid slots.

    Differentiable with respect to `draft` only.

    The backward pass only ever receives a per-slot upstream gradient (one per component), because every loss
    reduction is a function of the per-slot values. The forward pass therefore stores the per-slot gradient for a unit upstream
    gradient, [M, H], and the backward pass just scales it (as fused linear cross-entropy does). Recomputing in the
    backward pass would instead repeat both vocabulary sweeps, i.e. double the matmuls, to save those [M, H].
    The gradient is only computed when `draft` requires one, so evaluation pays for the two sweeps alone.
    """

    @staticmethod
    def forward(
        ctx: Any,
        draft: Tensor,
        target: Tensor,
        weight: Tensor,
        labels: Tensor | None,
        loss_type: str,
        temperature: float,
        token_tile: int,
        vocab_tile: int,
        tile_math: TileMath,
        draft_weight: Tensor | None,
        draft_vocab: Tensor | None,
        target_lse: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        value, tv, outside, grad = tiled_divergence(
            draft,
            target,
            weight,
            labels,
            loss_type=loss_type,
            temperature=temperature,
            token_tile=token_tile,
            vocab_tile=vocab_tile,
            need_grad=ctx.needs_input_grad[0],
            tile_math=tile_math,
            draft_weight=draft_weight,
            draft_vocab=draft_vocab,
            target_lse=target_lse,
        )
        ctx.save_for_backward(grad)
        ctx.draft_dtype = draft.dtype
        ctx.mark_non_differentiable(tv, outside)
        return value, tv, outside

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_value: Tensor, grad_tv: Tensor | None, grad_outside: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        grad_draft = grad * grad_value[..., None]
        if grad_draft.dim() == 3:  # [M, C, H]: the components' gradients add up
            grad_draft = grad_draft.sum(dim=1)
        grad_draft = grad_draft.to(ctx.draft_dtype)
        return grad_draft, *(None,) * 11
