"""What the trainers share about the head: loading the head a config names, and its teacher-forced loss on a batch
(the MTP trainer's loss and the GRPO trainers' online updates)."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..modeling import MTPHead
from ..modeling.native import NATIVE_HEAD
from ..modeling.teacher_forcing import drafting_slots, policy_hidden_states, slot_targets, unroll_teacher_forced
from ..ops import MTPLossOutput, mtp_loss
from ..ops.chunked import policy_log_normalizer as log_normalizer
from ..speculative.engine import eval_mode


if TYPE_CHECKING:
    from accelerate import Accelerator


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
        loss_type: A loss type of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss].
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


def online_head_step(
    head: MTPHead,
    optimizer: torch.optim.Optimizer,
    policy: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    is_completion: torch.Tensor,
    *,
    num_steps: int,
    loss_type: str,
    temperature: float,
    max_grad_norm: float,
    average_gradients: Callable[[], None] = lambda: None,
) -> tuple[MTPLossOutput, float]:
    """One optimizer step of the head on rollouts, the RL trainers' online update; the policy only provides hidden
    states (no gradient), and the head learns to draft where rollouts draft: after the prompt.

    Args:
        head: The head, bound to `policy`, in float32 (its master weights).
        optimizer: The head's optimizer.
        policy: The policy as it generated the rollouts.
        input_ids: [B, T] prompts and completions.
        attention_mask: [B, T] padding mask.
        is_completion: [B, T] True at completion tokens.
        num_steps: Draft steps (the rollouts' tokens per cycle).
        loss_type: A loss type of [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss].
        temperature: The rollouts' sampling temperature.
        max_grad_norm: Gradient clipping of the head.
        average_gradients: Averages the head's gradients over processes (several processes keep one head).

    Returns:
        The loss output and the gradient norm before clipping.

    Raises:
        FloatingPointError: If the loss is not finite (the head is left unchanged).
    """
    with torch.no_grad(), eval_mode(policy):
        policy_hidden, aux_hidden = policy_hidden_states(policy, input_ids, attention_mask, head.aux_layers)
    head.train().requires_grad_(True)
    try:
        result = teacher_forced_head_loss(
            head,
            input_ids,
            policy_hidden,
            attention_mask,
            num_steps=num_steps,
            loss_type=loss_type,
            temperature=temperature,
            slot_mask=drafting_slots(is_completion.bool(), num_steps),
            aux_hidden=aux_hidden,
        )
        if not torch.isfinite(result.loss):
            raise FloatingPointError(
                f"The online head update's {loss_type} loss is {result.loss.item()}; lower mtp_online_learning_rate "
                "or mtp_online_max_grad_norm."
            )
        result.loss.backward()
        average_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        head.eval().requires_grad_(False)
    return result, float(grad_norm)


def average_head_gradients(accelerator: "Accelerator", head: MTPHead) -> None:
    """Averages the head's gradients over processes, so every process keeps the same head."""
    if accelerator.num_processes == 1:
        return
    for param in head.parameters():
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def log_online_head_step(
    metrics: dict[str, list], accelerator: "Accelerator", result: MTPLossOutput, grad_norm: float
) -> None:
    """Appends an online head step's loss, gradient norm and per-step acceptance (averaged over processes) to a
    trainer's metrics."""
    metrics["mtp_online/loss"].append(accelerator.gather(result.loss.detach()).mean().item())
    metrics["mtp_online/grad_norm"].append(float(grad_norm))
    for j, acceptance in enumerate(accelerator.gather(result.acceptance.unsqueeze(0)).mean(0).tolist()):
        metrics[f"mtp_online/acceptance_step_{j + 1}"].append(acceptance)


def load_head(policy: torch.nn.Module, mtp_head: str, *, loaded: MTPHead | None = None) -> MTPHead:
    """The head a trainer config's `mtp_head` names, checked against `policy` and bound to it.

    Args:
        policy: The policy the head drafts for.
        mtp_head: A saved head's folder or Hub id, or `"native"` for the policy checkpoint's own MTP weights.
        loaded: The same head, already read without a policy (e.g. to export it for vLLM before the policy was
            built): bound instead of read again.

    Raises:
        ValueError: If the head does not match the policy (hidden size, vocabulary, architecture, base model).
    """
    if loaded is not None:
        return loaded.bind(policy)
    if mtp_head == NATIVE_HEAD:
        return MTPHead.from_native(policy.config.name_or_path, policy=policy)
    return MTPHead.from_pretrained(mtp_head, policy=policy)


def as_master_head(head: MTPHead, policy: torch.nn.Module) -> MTPHead:
    """The head on the policy's device in float32, frozen between updates: the master weights of online updates."""
    device = policy.get_input_embeddings().weight.device
    return head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
