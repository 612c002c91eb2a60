"""Distillation losses of an MTP draft head against its frozen policy, without materialising the logits.

The draft head and the policy share the policy's frozen lm_head `W` [V, H]. For a token slot (draft step `j`,
start position `t`) the head's distribution is `q = softmax(draft_hidden @ W^T / T)` and the policy's is
`p = softmax(target_hidden @ W^T / T)`. [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] trains `q` towards `p`
and reports how often a speculative verifier would accept the draft, tiling over slots and vocabulary so that no
[slots, V] logits tensor ever exists.

A head may draft from a subset D of the vocabulary, with its own lm_head rows `W_D` [|D|, H]: then
`q = softmax(draft_hidden @ W_D^T / T)` lives on D (it is 0 elsewhere), while `p` stays the policy's
full-vocabulary distribution, so that the reported acceptance `sum_{v in D} min(p_v, q_v) <= p(D)` is exactly the
one rejection sampling achieves.
"""

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .chunked import KL_AND_TV, MTPDivergenceFunction, TileMath, TorchTileMath, compute_dtype


LossType = Literal["ce", "kl", "rkl", "tv", "e2e_tv", "lk_alpha", "lk_lambda", "e2e_lk_alpha", "e2e_lk_lambda"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
"""Every loss type of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss], the one list the configs offer."""
Backend = Literal["auto", "torch", "triton"]

# The per-slot divergence each loss type reduces: the LK and chain losses are functions of per-slot TVs (and KLs).
_DIVERGENCE_OF = {
    "ce": "ce",
    "kl": "kl",
    "rkl": "rkl",
    "tv": "tv",
    "e2e_tv": "tv",
    "lk_alpha": "tv",
    "e2e_lk_alpha": "tv",
    "lk_lambda": KL_AND_TV,
    "e2e_lk_lambda": KL_AND_TV,
}

DEFAULT_TOKEN_TILE = 512
DEFAULT_VOCAB_TILE = 65536


@dataclass
class MTPLossOutput:
    """Loss and acceptance statistics of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss].

    All fields are float32 (float64 for float64 inputs). A draft step without any valid slot has NaN `tv` and
    `acceptance`, since there is nothing to average.

    Attributes:
        loss: Scalar training loss; differentiable with respect to `draft_hidden` only.
        tv: [S] mean total-variation distance between `p` and `q` per draft step, over valid slots (detached).
        acceptance: [S] mean acceptance probability `1 - TV` per draft step, over valid slots (detached).
        expected_accepted_length: Scalar (detached): expected number of accepted draft tokens per start position,
            `sum_j prod_{i<=j} (1 - TV_{t,i})` over the valid steps of `t`, averaged over start positions with at
            least one valid slot.
        target_mass_outside_draft_vocab: [S] mean probability the policy puts outside the draft vocabulary per
            draft step, over valid slots (detached): `1 - acceptance` can never fall below it. All zeros without a
            draft vocabulary.
    """

    loss: Tensor
    tv: Tensor
    acceptance: Tensor
    expected_accepted_length: Tensor
    target_mass_outside_draft_vocab: Tensor


def mtp_loss(
    draft_hidden: Tensor,
    target_hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    loss_type: LossType = "e2e_tv",
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    token_tile: int = DEFAULT_TOKEN_TILE,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
    backend: Backend = "auto",
    draft_lm_head_weight: Tensor | None = None,
    draft_vocab: Tensor | None = None,
    target_lse: Tensor | None = None,
    kl_scale: float = 1.0,
    kl_decay: float = 1.0,
) -> MTPLossOutput:
    """Distillation loss of an MTP draft head against its frozen policy, computed tile by tile.

    With `q` the head's and `p` the policy's next-token distribution at a slot, the loss types are:

    - `"ce"`: cross-entropy `-log q(label)` against `labels`.
    - `"kl"`: forward KL divergence `KL(p || q)`.
    - `"rkl"`: reverse KL divergence `KL(q || p)`.
    - `"tv"`: total-variation distance `TV(p, q) = 1 - sum_v min(p_v, q_v)`, which is one minus the probability
      that speculative sampling accepts the drafted token.
    - `"e2e_tv"`: one minus the expected accepted prefix length, normalised: with `alpha_{t,j} = 1 - TV(p, q)` at
      start position `t` and draft step `j`, the loss is `1 - sum_{t,j} prod_{i<=j} alpha_{t,i} / (#valid slots)`.
      A step's TV thereby also receives gradient through every later step's acceptance product.
    - `"lk_alpha"`: the LK loss `-log alpha_j` of each draft step's acceptance `alpha_j`, the mean of `1 - TV(p, q)`
      over the step's valid slots, averaged over the steps. Its gradient is the TV's scaled by `1 / alpha_j`, so it
      does not vanish where draft and target barely overlap, as the TV's does.
    - `"lk_lambda"`: the LK blend `w_j KL_j + (1 - w_j) TV_j` of each step's mean forward KL and mean TV, averaged
      over the steps, with `w_j = kl_scale * exp(-kl_decay * alpha_j)` (no gradient through `w_j`): mostly KL
      while the acceptance is low, more TV as it rises.
    - `"e2e_lk_alpha"`: `-log` of the chain objective, `-log(sum_{t,j} prod_{i<=j} alpha_{t,i} / #valid slots)`:
      `"e2e_tv"`'s gradient scaled by one over its expected accepted fraction.
    - `"e2e_lk_lambda"`: `w KL + (1 - w) L_e2e_tv`, with `KL` the mean forward KL over the valid slots, `L_e2e_tv`
      the `"e2e_tv"` loss and `w = kl_scale * exp(-kl_decay * (1 - L_e2e_tv))`.

    `"ce"`, `"kl"`, `"rkl"` and `"tv"` are averaged over the valid slots. TV statistics are returned for every loss
    type, so training with any of them can be monitored by acceptance.

    With a draft vocabulary D (`draft_lm_head_weight` and `draft_vocab`), `q` is the head's softmax over D and 0
    elsewhere, and `p` is still the policy's softmax over the whole vocabulary:

    - `"tv"`, `"e2e_tv"` and the reported statistics use `TV(p, q) = 1 - sum_{v in D} min(p_v, q_v)`, so the
      acceptance is at most `p(D)` and the policy's mass outside D counts as rejected, as in rejection sampling.
      `p` is never renormalised over D, which would overstate the acceptance.
    - `"rkl"`: `KL(q || p) = sum_{v in D} q_v log(q_v / p_v)`, finite and exact since `q` is 0 outside D; it is at
      least `-log p(D)`.
    - `"kl"` (and the KL of the `"lambda"` forms): `KL(p || q)` is infinite whenever `p` has mass outside D, so the
      loss is `KL(p_D || q)` against `p_D = p / p(D)`, the policy renormalised over D. Its minimiser `q = p_D` also minimises the TV over
      drafts on D (it reaches the ceiling `p(D)`), so it trains towards the right head; its value is no bound on
      the acceptance, which the returned statistics report against `p` itself.
    - `"ce"`: `-log q(label)`, averaged over the valid slots whose label lies in D; the other slots are skipped
      (their loss would be infinite and no draft on D can predict them).

    The logits `h @ W^T / T` of either model are never materialised: the op walks over tiles of `token_tile` slots
    by up to `vocab_tile` vocabulary entries with an online log-sum-exp, so its extra memory is a few float32 tiles
    plus [valid slots, H] buffers. It sweeps the vocabulary twice, since TV needs both models' normalisers before
    it can compare probabilities; the second sweep starts on the tile the first ended on and does not recompute
    it. The defaults therefore keep vocabularies of up to 65536 entries in a single tile, so that nothing is
    recomputed, at about four [512, V] float32 tiles of memory; smaller tiles use less memory and recompute more.
    Tile math runs in float32 (float64 for float64 inputs) whatever the input dtype. On CUDA with Triton installed,
    fused Triton kernels do the element-wise tile math (not for float64 inputs: the kernels compute in float32).

    Only `draft_hidden` receives a gradient. The lm_head and the policy are frozen: `lm_head_weight` and
    `target_hidden` get no gradient, even if they require one.

    Args:
        draft_hidden: [S, N, H] the head's final hidden state for draft step `j` (`j < S`) at start position `n`.
        target_hidden: [S, N, H] the policy's final hidden state for the same token slot.
        lm_head_weight: [V, H] the policy's lm_head weight, shared by both models.
        loss_type: Which divergence to train on, see above.
        mask: [S, N] bool, True for valid slots; `None` means all valid. It must be prefix-closed along the draft
            steps (`mask[j]` implies `mask[j - 1]`), since step `j` can only be accepted after step `j - 1`.
        labels: [S, N] token ids, required for `"ce"` and ignored otherwise; masked slots may hold any value
            (e.g. -100).
        temperature: Softmax temperature `T > 0` applied to both models' logits.
        token_tile: Slots per tile.
        vocab_tile: Maximum vocabulary entries per tile; the vocabulary is split into equal tiles.
        backend: `"auto"` uses Triton for CUDA inputs when it is installed and PyTorch otherwise; `"torch"` and
            `"triton"` force one. `"triton"` needs the triton package and inputs in float32, bfloat16 or float16 on
            CUDA, or on CPU with Triton's interpreter enabled (`TRITON_INTERPRET=1` in the environment before the
            first Triton call), which runs the kernels slowly in Python to test them without a GPU.
        draft_lm_head_weight: [|D|, H] the head's own lm_head rows over its draft vocabulary D, or None when the
            head drafts from the whole vocabulary with `lm_head_weight`. Frozen: it gets no gradient.
        draft_vocab: [|D|] the target token id of each row of `draft_lm_head_weight`, strictly increasing; given
            together with it.
        target_lse: [S, N] the log-sum-exp over the whole vocabulary of each slot's policy logits
            `target_hidden @ lm_head_weight^T / temperature`, or None to compute it inside. Slot (j, n) usually
            targets the same policy position as slot (j - 1, n + 1), so computing it once per position with
            [`policy_log_normalizer`][bebop_trl.ops.chunked.policy_log_normalizer] and gathering it per slot spares
            a sweep of the policy's logits per slot: the first sweep then computes the draft's logits alone, and a
            draft vocabulary no longer costs a whole-vocabulary sweep per slot. The values are trusted as given.
        kl_scale: The KL weight of the `"lambda"` forms at zero acceptance, in [0, 1].
        kl_decay: How fast that weight decays as the acceptance rises (>= 0).

    Returns:
        The loss and the acceptance statistics.

    Raises:
        ValueError: If shapes, dtypes or options are inconsistent, the mask is not prefix-closed or has no valid
            slot, `labels` are missing or out of range for `"ce"`, or the draft vocabulary is inconsistent.

    Example:
        ```python
        out = mtp_loss(head_hidden, policy_hidden, policy.lm_head.weight, mask=valid)
        out.loss.backward()
        print(out.acceptance, out.expected_accepted_length)
        ```
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
        target_lse=target_lse,
        kl_scale=kl_scale,
        kl_decay=kl_decay,
    )
    if token_tile < 1 or vocab_tile < 1:
        raise ValueError(f"token_tile and vocab_tile must be positive, got {token_tile} and {vocab_tile}.")
    weights = (lm_head_weight,) if draft_lm_head_weight is None else (lm_head_weight, draft_lm_head_weight)
    dtype = compute_dtype(draft_hidden, target_hidden, *weights)
    tile_math = _tile_math(_select_backend(backend, lm_head_weight.device, dtype))

    slot_labels = labels[mask] if loss_type == "ce" else None
    label_in_draft_vocab = None
    if slot_labels is not None and draft_vocab is not None:
        slot_labels, label_in_draft_vocab = draft_indices(slot_labels, draft_vocab, lm_head_weight.shape[0])

    # Masked slots are dropped before the vocabulary sweeps, so padding costs nothing.
    value, tv, outside = MTPDivergenceFunction.apply(
        draft_hidden[mask],
        target_hidden.detach()[mask],
        lm_head_weight.detach(),
        slot_labels,
        _DIVERGENCE_OF[loss_type],
        float(temperature),
        token_tile,
        vocab_tile,
        tile_math,
        None if draft_lm_head_weight is None else draft_lm_head_weight.detach(),
        draft_vocab,
        None if target_lse is None else target_lse.detach()[mask],
    )

    # The reductions run on [S, N] per-slot values with ordinary torch ops, so autograd propagates the e2e_tv
    # products (and the LK forms' logarithms and blends) back to each slot exactly.
    valid = mask.to(value.dtype)
    kl = None
    if value.dim() == 2:
        kl, value = value.unbind(dim=1)
    if loss_type.startswith("e2e_"):
        # Masked slots have TV 0, i.e. acceptance 1: they neither break the products nor are counted.
        survival = torch.cumprod(1 - value.new_zeros(mask.shape).masked_scatter(mask, value), dim=0)
        chain = (survival * valid).sum() / len(value)
        if loss_type == "e2e_tv":
            loss = 1 - chain
        elif loss_type == "e2e_lk_alpha":
            loss = -_safe_log(chain)
        else:
            weight = kl_scale * torch.exp(-kl_decay * chain.detach())
            loss = weight * kl.mean() + (1 - weight) * (1 - chain)
    elif loss_type.startswith("lk_"):
        # Per draft step, over the steps that have a valid slot.
        steps = mask.any(dim=1)
        step_tv = (value.new_zeros(mask.shape).masked_scatter(mask, value).sum(dim=1) / valid.sum(dim=1))[steps]
        if loss_type == "lk_alpha":
            loss = -_safe_log(1 - step_tv).mean()
        else:
            step_kl = (kl.new_zeros(mask.shape).masked_scatter(mask, kl).sum(dim=1) / valid.sum(dim=1))[steps]
            weight = kl_scale * torch.exp(-kl_decay * (1 - step_tv.detach()))
            loss = (weight * step_kl + (1 - weight) * step_tv).mean()
    elif label_in_draft_vocab is not None:
        # A batch without any label in D has loss 0 and no gradient, rather than 0 / 0.
        counted = label_in_draft_vocab.to(value.dtype)
        loss = (value * counted).sum() / counted.sum().clamp_min(1)
    else:
        loss = value.mean()

    with torch.no_grad():
        slot_tv = tv.new_zeros(mask.shape).masked_scatter(mask, tv)
        step_tv = slot_tv.sum(dim=1) / valid.sum(dim=1)
        step_outside = outside.new_zeros(mask.shape).masked_scatter(mask, outside).sum(dim=1) / valid.sum(dim=1)
        accepted = (torch.cumprod(1 - slot_tv, dim=0) * valid).sum(dim=0)
        # With a prefix-closed mask, a start position has a valid slot exactly when its first step is valid.
        expected_accepted_length = accepted[mask[0]].mean()

    return MTPLossOutput(
        loss=loss,
        tv=step_tv,
        acceptance=1 - step_tv,
        expected_accepted_length=expected_accepted_length,
        target_mass_outside_draft_vocab=step_outside,
    )


def _safe_log(acceptance: Tensor) -> Tensor:
    """`log` of an acceptance, floored at the dtype's smallest normal number: a draft that never overlaps the
    policy then gets a large finite loss without gradient rather than an infinite one."""
    return acceptance.clamp_min(torch.finfo(acceptance.dtype).tiny).log()


def draft_indices(labels: Tensor, draft_vocab: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Maps target token ids to row indices of a draft vocabulary.

    Args:
        labels: Target token ids in `[0, vocab_size)`, any shape.
        draft_vocab: [|D|] the target ids of the draft vocabulary's rows.
        vocab_size: Size of the target vocabulary.

    Returns:
        The row index of each label in `draft_vocab` (0 for labels outside it) and a bool tensor, True where the
        label is in the draft vocabulary.
    """
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=labels.device)
    index[draft_vocab] = torch.arange(len(draft_vocab), device=labels.device)
    rows = index[labels]
    return rows.clamp_min(0), rows >= 0


class MTPLoss(nn.Module):
    """Module form of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss], holding its options.

    Args:
        loss_type: Which divergence to train on, see [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss].
        temperature: Softmax temperature applied to both models' logits.
        token_tile: Slots per tile.
        vocab_tile: Vocabulary entries per tile.
        backend: `"auto"`, `"torch"` or `"triton"`.
        kl_scale: KL weight of the `"lambda"` forms at zero acceptance.
        kl_decay: Decay of that weight with the acceptance.

    Example:
        ```python
        criterion = MTPLoss(loss_type="kl")
        out = criterion(head_hidden, policy_hidden, policy.lm_head.weight, mask=valid)
        ```
    """

    def __init__(
        self,
        loss_type: LossType = "e2e_tv",
        temperature: float = 1.0,
        token_tile: int = DEFAULT_TOKEN_TILE,
        vocab_tile: int = DEFAULT_VOCAB_TILE,
        backend: Backend = "auto",
        kl_scale: float = 1.0,
        kl_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.loss_type = loss_type
        self.temperature = temperature
        self.token_tile = token_tile
        self.vocab_tile = vocab_tile
        self.backend = backend
        self.kl_scale = kl_scale
        self.kl_decay = kl_decay

    def forward(
        self,
        draft_hidden: Tensor,
        target_hidden: Tensor,
        lm_head_weight: Tensor,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        draft_lm_head_weight: Tensor | None = None,
        draft_vocab: Tensor | None = None,
        target_lse: Tensor | None = None,
    ) -> MTPLossOutput:
        """Computes the loss, see [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] for the arguments."""
        return mtp_loss(
            draft_hidden,
            target_hidden,
            lm_head_weight,
            loss_type=self.loss_type,
            mask=mask,
            labels=labels,
            temperature=self.temperature,
            token_tile=self.token_tile,
            vocab_tile=self.vocab_tile,
            backend=self.backend,
            draft_lm_head_weight=draft_lm_head_weight,
            draft_vocab=draft_vocab,
            target_lse=target_lse,
            kl_scale=self.kl_scale,
            kl_decay=self.kl_decay,
        )

    def extra_repr(self) -> str:
        """The loss type and temperature, shown in the module's `repr`."""
        return f"loss_type={self.loss_type!r}, temperature={self.temperature}"


def validate_inputs(
    draft_hidden: Tensor,
    target_hidden: Tensor,
    lm_head_weight: Tensor,
    loss_type: str,
    mask: Tensor | None,
    labels: Tensor | None,
    temperature: float,
    *,
    draft_lm_head_weight: Tensor | None = None,
    draft_vocab: Tensor | None = None,
    target_lse: Tensor | None = None,
    kl_scale: float = 1.0,
    kl_decay: float = 1.0,
) -> Tensor:
    """Checks the arguments shared by [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] and its reference implementation.

    Returns:
        The [S, N] bool validity mask, all True when `mask` is None.

    Raises:
        ValueError: On the first inconsistency found, naming it and how to fix it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}.")
    if not (isinstance(kl_scale, int | float) and 0 <= kl_scale <= 1):
        raise ValueError(
            f"kl_scale must lie in [0, 1] (the KL weight of the lambda forms at zero acceptance), got {kl_scale!r}."
        )
    if not (isinstance(kl_decay, int | float) and math.isfinite(kl_decay) and kl_decay >= 0):
        raise ValueError(f"kl_decay must be a finite number >= 0, got {kl_decay!r}.")
    if draft_hidden.dim() != 3:
        raise ValueError(
            f"draft_hidden must be [S, N, H] (draft steps, start positions, hidden size), got shape "
            f"{tuple(draft_hidden.shape)}; stack the per-step hidden states along a leading dimension."
        )
    if target_hidden.shape != draft_hidden.shape:
        raise ValueError(
            f"target_hidden has shape {tuple(target_hidden.shape)} but draft_hidden has {tuple(draft_hidden.shape)}; "
            "pass the policy's hidden state for exactly the same token slots."
        )
    num_steps, num_positions, hidden_size = draft_hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_size:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = {hidden_size} (the hidden size of draft_hidden), got shape "
            f"{tuple(lm_head_weight.shape)}; pass the policy's lm_head weight, not its transpose."
        )
    for name, tensor in (("draft_hidden", draft_hidden), ("target_hidden", target_hidden)):
        if not tensor.is_floating_point() or tensor.device != lm_head_weight.device:
            raise ValueError(
                f"{name} must be a floating-point tensor on the device of lm_head_weight ({lm_head_weight.device}), "
                f"got {tensor.dtype} on {tensor.device}."
            )
    if not lm_head_weight.is_floating_point():
        raise ValueError(f"lm_head_weight must be floating-point, got {lm_head_weight.dtype}.")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")

    if mask is None:
        mask = torch.ones(num_steps, num_positions, dtype=torch.bool, device=draft_hidden.device)
    elif mask.shape != (num_steps, num_positions) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape [S, N] = {[num_steps, num_positions]}, got {mask.dtype} of shape "
            f"{tuple(mask.shape)}; build it with a comparison such as `lengths[None, :] > steps[:, None]`."
        )
    if (mask[1:] & ~mask[:-1]).any():
        raise ValueError(
            "mask must be prefix-closed along the draft steps: mask[j, n] True requires mask[j - 1, n] True, because "
            "a draft token can only be accepted after all earlier ones; clear every slot after a position's first "
            "invalid step."
        )
    if not mask.any():
        raise ValueError("mask has no valid slot, so the loss is undefined; skip this batch instead.")

    if loss_type == "ce" and labels is None:
        raise ValueError('loss_type="ce" needs labels: pass the [S, N] token ids the draft head should predict.')
    if labels is not None:
        if labels.shape != (num_steps, num_positions) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape [S, N] = {[num_steps, num_positions]}, got {labels.dtype} "
                f"of shape {tuple(labels.shape)}."
            )
        if loss_type == "ce":
            valid_labels = labels[mask]
            if ((valid_labels < 0) | (valid_labels >= lm_head_weight.shape[0])).any():
                raise ValueError(
                    f"labels of valid slots must lie in [0, {lm_head_weight.shape[0]}) (the vocabulary of "
                    "lm_head_weight); mark padded slots invalid in mask instead of using an ignore index."
                )
    if draft_lm_head_weight is not None or draft_vocab is not None:
        _validate_draft_vocab(lm_head_weight, draft_lm_head_weight, draft_vocab)
    if target_lse is not None and (
        target_lse.shape != (num_steps, num_positions)
        or not target_lse.is_floating_point()
        or target_lse.device != lm_head_weight.device
    ):
        raise ValueError(
            f"target_lse must be a floating-point [S, N] = {[num_steps, num_positions]} tensor on the device of "
            f"lm_head_weight, got {target_lse.dtype} of shape {tuple(target_lse.shape)} on {target_lse.device}; "
            "compute it with policy_log_normalizer over the policy's hidden states and gather it per slot."
        )
    return mask


def _validate_draft_vocab(lm_head_weight: Tensor, draft_weight: Tensor | None, draft_vocab: Tensor | None) -> None:
    if draft_weight is None or draft_vocab is None:
        raise ValueError(
            "Pass draft_lm_head_weight and draft_vocab together (a head with a draft vocabulary has both: "
            "head.draft_lm_head_weight and head.draft_vocab), or neither for a head drafting from the whole vocabulary."
        )
    vocab_size, hidden_size = lm_head_weight.shape
    if draft_weight.dim() != 2 or draft_weight.shape[1] != hidden_size or not draft_weight.is_floating_point():
        raise ValueError(
            f"draft_lm_head_weight must be a floating-point [|D|, H] tensor with H = {hidden_size}, got "
            f"{draft_weight.dtype} of shape {tuple(draft_weight.shape)}."
        )
    if draft_vocab.dim() != 1 or draft_vocab.dtype.is_floating_point or draft_vocab.dtype == torch.bool:
        raise ValueError(
            f"draft_vocab must be a 1-D integer tensor of target token ids, got {draft_vocab.dtype} of shape "
            f"{tuple(draft_vocab.shape)}."
        )
    if len(draft_vocab) != draft_weight.shape[0]:
        raise ValueError(
            f"draft_vocab has {len(draft_vocab)} ids but draft_lm_head_weight has {draft_weight.shape[0]} rows; "
            "row j of the draft lm_head must be the one of target token draft_vocab[j]."
        )
    for name, tensor in (("draft_lm_head_weight", draft_weight), ("draft_vocab", draft_vocab)):
        if tensor.device != lm_head_weight.device:
            raise ValueError(
                f"{name} must be on the device of lm_head_weight ({lm_head_weight.device}), got {tensor.device}."
            )
    if len(draft_vocab) == 0:
        raise ValueError("draft_vocab is empty: a draft vocabulary needs at least one token.")
    if (draft_vocab[1:] <= draft_vocab[:-1]).any():
        raise ValueError("draft_vocab must be strictly increasing (sorted target ids, each once).")
    if draft_vocab[0] < 0 or draft_vocab[-1] >= vocab_size:
        raise ValueError(f"draft_vocab ids must lie in [0, {vocab_size}) (the rows of lm_head_weight).")


def _select_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Literal["torch", "triton"]:
    """Resolves `backend` for inputs on `device` whose tile math runs in `dtype`, without importing Triton.

    `dtype` is the tile-math dtype of `chunked.compute_dtype`: float32 for float32, bfloat16 and float16 inputs,
    float64 as soon as one input is float64.
    """
    if backend not in get_args(Backend):
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(get_args(Backend))}.")
    if backend == "torch":
        return "torch"
    # CPU tensors reach the kernels only on request: the interpreter is a test harness, far slower than PyTorch, and
    # "auto" must not import Triton for CPU users.
    interpreted = backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    # The kernels accumulate in float32 scalars, which Triton cannot re-type to float64 inside their loops; float64
    # inputs (e.g. gradcheck) stay on the PyTorch path.
    triton_ok = (
        (device.type == "cuda" or interpreted)
        and dtype == torch.float32
        and importlib.util.find_spec("triton") is not None
    )
    if backend == "triton" and not triton_ok:
        raise ValueError(
            'backend="triton" needs the triton package and inputs in float32, bfloat16 or float16 (not float64), on '
            "CUDA or, with Triton's interpreter (TRITON_INTERPRET=1 in the environment), on CPU; "
            'use backend="torch" or "auto" otherwise.'
        )
    return "triton" if triton_ok else "torch"


def _tile_math(backend: Literal["torch", "triton"]) -> TileMath:
    if backend == "torch":
        return TorchTileMath()
    # Imported here so that the PyTorch path (all CPU inputs outside Triton's interpreter) never imports triton.
    from .triton_kernels import TritonTileMath

    return TritonTileMath()
