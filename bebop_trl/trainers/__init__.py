"""Trainers: pre-RL head training and GRPO with speculative rollouts."""

from .grpo_config import BebopGRPOConfig
from .grpo_trainer import BebopGRPOTrainer
from .mtp_config import MTPConfig
from .mtp_trainer import MTPTrainer


__all__ = ["BebopGRPOConfig", "BebopGRPOTrainer", "MTPConfig", "MTPTrainer"]
