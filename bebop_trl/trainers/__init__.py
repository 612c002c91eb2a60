"""Trainers: pre-RL head training and GRPO with speculative rollouts."""

from .mtp_config import MTPConfig
from .mtp_trainer import MTPTrainer


__all__ = ["MTPConfig", "MTPTrainer"]
