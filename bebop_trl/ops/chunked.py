"""Tiled engine behind [`mtp_loss`][bebop_trl.ops.mtp_loss.mtp_loss]: per-slot divergences without [slots, V] logits.

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
            acc: [2, t] running TV distance `0.5 * sum_v |q_v - p_v|` and running statistic of the divergence;
                updated in place.
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
        finish: `(tv, stat, terms, lse_q, h, weight, labels) -> (value, grad)`, with `terms` the [k, t, H]
            accumulators (None without gradient), `h` the temperature-scaled hidden states and `grad` the derivative
            of `value` with respect to `h`.
    """

    grad_terms: int
    tile: Callable[[Tensor, Tensor, Tensor, bool, Workspace], tuple[Tensor, ...]]
    finish: Callable[..., tuple[Tensor, Tensor | None]]


# Divergence gradients with respect to the draft logits z, with q = softmax(z), p fixed:
#   TV:  -q_v (1[q_v <= p_v] - S), S = sum_u 1[q_u <= p_u] q_u  ->  S * (q @ W) - (q 1[q <= p]) @ W
#   KL(p || q):  q - p
#   KL(q || p):  q_v (log q_v - log p_v - KL(q || p))  ->  (q log(q/p)) @ W - KL * (q @ W)
#   CE:  q - onehot(label)  ->  q @ W - W[label]
# TV's S and the reverse KL are only known once the sweep is done, hence the second accumulator `q @ W` for both.


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


def _tv_finish(tv: Tensor, stat: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return tv, None if terms is None else stat[:, None] * terms[1] - terms[0]


def _kl_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    log_ratio = torch.sub(log_p, log_q, out=workspace.tile("scratch", log_q.shape, log_q))
    q, p = log_q.exp_(), log_p.exp_()
    # Where p underflows to 0 its term is 0: log q is always finite.
    acc[1] += log_ratio.mul_(p).sum(dim=1)
    p_minus_q = _add_tv(q, p, acc[0])
    return (p_minus_q.neg_(),) if need_grad else ()


def _kl_finish(tv: Tensor, stat: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return stat, None if terms is None else terms[0]


def _rkl_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    q_log_ratio = torch.sub(log_q, log_p, out=workspace.tile("scratch", log_q.shape, log_q))
    q = log_q.exp_()
    acc[1] += q_log_ratio.mul_(q).sum(dim=1)
    _add_tv(q, log_p.exp_(), acc[0])
    return (q_log_ratio, q) if need_grad else ()


def _rkl_finish(tv: Tensor, stat: Tensor, terms: Tensor | None, *_: Any) -> tuple[Tensor, Tensor | None]:
    return stat, None if terms is None else terms[0] - stat[:, None] * terms[1]


def _ce_tile(log_q: Tensor, log_p: Tensor, acc: Tensor, need_grad: bool, workspace: Workspace) -> tuple[Tensor, ...]:
    q = log_q.exp_()
    _add_tv(q, log_p.exp_(), acc[0])
    return (q,) if need_grad else ()


def _ce_finish(
    tv: Tensor, stat: Tensor, terms: Tensor | None, lse_q: Tensor, h: Tensor, weight: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor | None]:
    # The label's logit and one-hot gradient are one row of W per slot, cheaper to gather than to find in tiles.
    label_rows = weight[labels].to(h.dtype)
    value = lse_q - (h * label_rows).sum(dim=1)
    return value, None if terms is None else terms[0] - label_rows


DIVERGENCES: dict[str, Divergence] = {
    "ce": Divergence(1, _ce_tile, _ce_finish),
    "kl": Divergence(1, _kl_tile, _kl_finish),
    "rkl": Divergence(2, _rkl_tile, _rkl_finish),
    "tv": Divergence(2, _tv_tile, _tv_finish),
    "e2e_tv": Divergence(2, _tv_tile, _tv_finish),
}


class TorchTileMath:
    """`TileMath` in plain PyTorch, for every device."""

    def online_lse(self, zq: Tensor, zp: Tensor, state: Tensor, workspace: Workspace) -> None:
        for z, running_max, running_sum in ((zq, state[0], state[1]), (zp, state[2], state[3])):
            new_max = torch.maximum(running_max, z.amax(dim=1))
            shifted = torch.sub(z, new_max[:, None], out=workspace.tile("scratch", z.shape, z))
            running_sum.mul_((running_max - new_max).exp_()).add_(shifted.exp_().sum(dim=1))
            running_max.copy_(new_max)

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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-slot divergence, TV distance and gradient, sweeping the vocabulary twice per tile of slots.

    The first sweep accumulates both models' log-sum-exp online. TV compares normalised probabilities, so
    everything else waits for the second sweep, which recomputes the logits tiles and accumulates the TV, the
    loss's statistic and, if `need_grad`, the gradient products `c @ W`. The second sweep runs backwards over the
    vocabulary, so its first tile is the one the first sweep ended on and is not recomputed.

    Args:
        draft: [M, H] the head's hidden states of the valid slots.
        target: [M, H] the policy's hidden states of the same slots.
        weight: [V, H] the shared lm_head weight.
        labels: [M] target token ids (`"ce"` only).
        loss_type: A key of `DIVERGENCES`.
        temperature: Softmax temperature.
        token_tile: Slots per tile.
        vocab_tile: Maximum vocabulary entries per tile.
        need_grad: Whether to compute the gradient.
        tile_math: Element-wise tile implementation.

    Returns:
        The [M] divergence, the [M] TV distance and, if `need_grad`, the [M, H] gradient of each slot's divergence
        with respect to its `draft` row, all in float32 (float64 for float64 inputs).
    """
    divergence = DIVERGENCES[loss_type]
    dtype = compute_dtype(draft, target, weight)
    num_slots, hidden_size = draft.shape
    vocab_size = weight.shape[0]
    # Equal vocabulary tiles: as many sweeps as `vocab_tile` implies, but no small remainder tile, so the tile
    # that the second sweep reuses from the first is a full one.
    vocab_tile = -(-vocab_size // -(-vocab_size // vocab_tile))
    vocab_starts = range(0, vocab_size, vocab_tile)
    value = draft.new_empty(num_slots, dtype=dtype)
    tv = torch.empty_like(value)
    grad = draft.new_empty(num_slots, hidden_size, dtype=dtype) if need_grad else None
    workspace = Workspace()

    def weight_tile(vocab_start: int) -> Tensor:
        rows = weight[vocab_start : vocab_start + vocab_tile]
        return rows if rows.dtype == dtype else workspace.tile("weight", rows.shape, value).copy_(rows)

    def logits(h: Tensor, w: Tensor, name: str) -> Tensor:
        return torch.mm(h, w.T, out=workspace.tile(name, (h.shape[0], w.shape[0]), h))

    for start in range(0, num_slots, token_tile):
        rows = slice(start, start + token_tile)
        # 1/T is folded into the small [t, H] operands rather than into every [t, v] logits tile.
        hq = draft[rows].to(dtype) / temperature
        hp = target[rows].to(dtype) / temperature
        state = hq.new_zeros(4, hq.shape[0])
        state[0::2] = float("-inf")
        for vocab_start in vocab_starts:
            w = weight_tile(vocab_start)
            zq, zp = logits(hq, w, "zq"), logits(hp, w, "zp")
            tile_math.online_lse(zq, zp, state, workspace)
        lse_q = state[0] + state[1].log()
        lse_p = state[2] + state[3].log()

        acc = hq.new_zeros(2, hq.shape[0])
        terms = hq.new_zeros(divergence.grad_terms, *hq.shape) if need_grad else None
        for vocab_start in reversed(vocab_starts):
            if vocab_start != vocab_starts[-1]:
                w = weight_tile(vocab_start)
                zq, zp = logits(hq, w, "zq"), logits(hp, w, "zp")
            coefficients = tile_math.divergence(loss_type, zq, zp, lse_q, lse_p, acc, need_grad, workspace)
            for term, coefficient in zip(terms if need_grad else (), coefficients, strict=True):
                term.addmm_(coefficient, w)

        tile_labels = labels[rows] if labels is not None else None
        value[rows], tile_grad = divergence.finish(acc[0], acc[1], terms, lse_q, hq, weight, tile_labels)
        tv[rows] = acc[0]
        if need_grad:
            # Chain rule through z = h W^T / T.
            grad[rows] = tile_grad / temperature
    return value, tv, grad


class MTPDivergenceFunction(torch.autograd.Function):
    """Per-slot divergence and TV distance of the valid slots, differentiable with respect to `draft` only.

    The backward pass only ever receives a per-slot scalar upstream gradient, because every loss reduction is a
    function of the per-slot values. The forward pass therefore stores the per-slot gradient for a unit upstream
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
    ) -> tuple[Tensor, Tensor]:
        value, tv, grad = tiled_divergence(
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
        )
        ctx.save_for_backward(grad)
        ctx.draft_dtype = draft.dtype
        ctx.mark_non_differentiable(tv)
        return value, tv

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor, grad_tv: Tensor | None) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        grad_draft = (grad * grad_value[:, None]).to(ctx.draft_dtype)
        return grad_draft, None, None, None, None, None, None, None, None
