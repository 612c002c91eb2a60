"""Tensor ops: pure functions of tensors that depend on nothing else in bebop-trl."""

from .fused_mtp_loss import LOSS_TYPES, MTPLoss, MTPLossOutput, mtp_loss


__all__ = ["LOSS_TYPES", "MTPLoss", "MTPLossOutput", "mtp_loss"]
