"""Tensor ops: pure functions of tensors that depend on nothing else in bebop-trl."""

from .mtp_loss import MTPLoss, MTPLossOutput, mtp_loss


__all__ = ["MTPLoss", "MTPLossOutput", "mtp_loss"]
