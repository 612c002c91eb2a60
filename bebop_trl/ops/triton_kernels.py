"""Triton tile math for [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] on CUDA.

The tiled engine, the autograd function and the matmuls (cuBLAS) are the PyTorch path's; this module only fuses the
element-wise work on each [t, v] float32 logits tile into one kernel per sweep, one program per row. Only
`bebop_trl.ops.fused_mtp_loss` imports it: for CUDA inputs, or for CPU inputs with `backend="triton"` under Triton's
interpreter (`TRITON_INTERPRET=1`, read when this module defines the kernels), so CPU installs never need Triton.
"""

import torch
import triton
import triton.language as tl

from .chunked import DIVERGENCES, DRAFT_VOCAB_KL, KL_AND_TV, Workspace


# Loss codes of the pass-2 kernel, one per divergence of `chunked.DIVERGENCES`.
_LOSS_CODES = {"tv": 0, "kl": 1, "rkl": 2, "ce": 3, DRAFT_VOCAB_KL: 4, KL_AND_TV: 5}
_MAX_BLOCK_SIZE = 4096


@triton.jit
def _online_lse_kernel(zq_ptr, zp_ptr, state_ptr, n_rows, n_cols, BLOCK_SIZE: tl.constexpr):
    """Folds row `pid` of the [t, v] logits tiles into the running max and sum of exp of each model."""
    row = tl.program_id(0).to(tl.int64)
    zq_ptr += row * n_cols
    zp_ptr += row * n_cols
    max_q = tl.load(state_ptr + row)
    sum_q = tl.load(state_ptr + n_rows + row)
    max_p = tl.load(state_ptr + 2 * n_rows + row)
    sum_p = tl.load(state_ptr + 3 * n_rows + row)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        in_row = cols < n_cols
        zq = tl.load(zq_ptr + cols, mask=in_row, other=float("-inf"))
        zp = tl.load(zp_ptr + cols, mask=in_row, other=float("-inf"))
        new_max_q = tl.maximum(max_q, tl.max(zq, axis=0))
        sum_q = sum_q * tl.exp(max_q - new_max_q) + tl.sum(tl.exp(zq - new_max_q), axis=0)
        max_q = new_max_q
        new_max_p = tl.maximum(max_p, tl.max(zp, axis=0))
        sum_p = sum_p * tl.exp(max_p - new_max_p) + tl.sum(tl.exp(zp - new_max_p), axis=0)
        max_p = new_max_p
    tl.store(state_ptr + row, max_q)
    tl.store(state_ptr + n_rows + row, sum_q)
    tl.store(state_ptr + 2 * n_rows + row, max_p)
    tl.store(state_ptr + 3 * n_rows + row, sum_p)


@triton.jit
def _divergence_kernel(
    zq_ptr,
    zp_ptr,
    zs_ptr,
    lse_q_ptr,
    lse_p_ptr,
    acc_ptr,
    n_rows,
    n_cols,
    LOSS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Accumulates row `pid`'s TV and loss statistics and writes its gradient coefficients over the logits.

    The coefficients are those of `chunked.DIVERGENCES`: the first goes to `zq`, the second (if any) to `zp`, the
    third (if any) to the scratch tile `zs`.
    """
    row = tl.program_id(0).to(tl.int64)
    zq_ptr += row * n_cols
    zp_ptr += row * n_cols
    zs_ptr += row * n_cols
    lse_q = tl.load(lse_q_ptr + row)
    lse_p = tl.load(lse_p_ptr + row)
    tv = 0.0
    stat = 0.0
    stat2 = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        in_row = cols < n_cols
        # Out-of-row lanes get probability 0; their log-probabilities are masked wherever they are used.
        log_q = tl.load(zq_ptr + cols, mask=in_row, other=float("-inf")) - lse_q
        log_p = tl.load(zp_ptr + cols, mask=in_row, other=float("-inf")) - lse_p
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        tv += 0.5 * tl.sum(tl.abs(q - p), axis=0)
        if LOSS == 0:
            q_below_p = tl.where(q <= p, q, 0.0)
            stat += tl.sum(q_below_p, axis=0)
            if NEED_GRAD:
                tl.store(zq_ptr + cols, q_below_p, mask=in_row)
                tl.store(zp_ptr + cols, q, mask=in_row)
        elif LOSS == 1:
            stat += tl.sum(tl.where(in_row, p * (log_p - log_q), 0.0), axis=0)
            if NEED_GRAD:
                tl.store(zq_ptr + cols, q - p, mask=in_row)
        elif LOSS == 4:
            stat += tl.sum(tl.where(in_row, p * (log_p - log_q), 0.0), axis=0)
            if NEED_GRAD:
                tl.store(zq_ptr + cols, q, mask=in_row)
                tl.store(zp_ptr + cols, p, mask=in_row)
        elif LOSS == 5:
            stat += tl.sum(tl.where(in_row, p * (log_p - log_q), 0.0), axis=0)
            q_below_p = tl.where(q <= p, q, 0.0)
            stat2 += tl.sum(q_below_p, axis=0)
            if NEED_GRAD:
                tl.store(zq_ptr + cols, p, mask=in_row)
                tl.store(zp_ptr + cols, q_below_p, mask=in_row)
                tl.store(zs_ptr + cols, q, mask=in_row)
        elif LOSS == 2:
            q_log_ratio = tl.where(in_row, q * (log_q - log_p), 0.0)
            stat += tl.sum(q_log_ratio, axis=0)
            if NEED_GRAD:
                tl.store(zq_ptr + cols, q_log_ratio, mask=in_row)
                tl.store(zp_ptr + cols, q, mask=in_row)
        elif NEED_GRAD:
            tl.store(zq_ptr + cols, q, mask=in_row)
    tl.store(acc_ptr + row, tl.load(acc_ptr + row) + tv)
    tl.store(acc_ptr + n_rows + row, tl.load(acc_ptr + n_rows + row) + stat)
    if LOSS == 5:
        tl.store(acc_ptr + 2 * n_rows + row, tl.load(acc_ptr + 2 * n_rows + row) + stat2)


class TritonTileMath:
    """`chunked.TileMath` with fused Triton kernels for contiguous float32 tiles (CPU ones under the interpreter)."""

    def online_lse(self, zq: torch.Tensor, zp: torch.Tensor, state: torch.Tensor, workspace: Workspace) -> None:
        n_rows, n_cols = zq.shape
        _online_lse_kernel[(n_rows,)](zq, zp, state, n_rows, n_cols, BLOCK_SIZE=_block_size(n_cols), num_warps=8)

    def divergence(
        self,
        loss_type: str,
        zq: torch.Tensor,
        zp: torch.Tensor,
        lse_q: torch.Tensor,
        lse_p: torch.Tensor,
        acc: torch.Tensor,
        need_grad: bool,
        workspace: Workspace,
    ) -> tuple[torch.Tensor, ...]:
        n_rows, n_cols = zq.shape
        grad_terms = DIVERGENCES[loss_type].grad_terms
        # Only a three-term divergence writes a third tile; the others never touch `zs`.
        zs = workspace.tile("scratch", zq.shape, zq) if need_grad and grad_terms == 3 else zq
        _divergence_kernel[(n_rows,)](
            zq,
            zp,
            zs,
            lse_q,
            lse_p,
            acc,
            n_rows,
            n_cols,
            LOSS=_LOSS_CODES[loss_type],
            NEED_GRAD=need_grad,
            BLOCK_SIZE=_block_size(n_cols),
            num_warps=8,
        )
        return (zq, zp, zs)[:grad_terms] if need_grad else ()


def _block_size(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), _MAX_BLOCK_SIZE)
