"""bebop-trl: faster RL post-training of LLMs with multi-token-prediction speculative rollouts."""

from .modeling import MTPHead, MTPHeadConfig
from .speculative import SpeculativeGenerator
from .trainers import BebopGRPOConfig, BebopGRPOTrainer, MTPConfig, MTPTrainer


__version__ = "0.1.0.dev0"

__all__ = [
    "BebopGRPOConfig",
    "BebopGRPOTrainer",
    "MTPConfig",
    "MTPHead",
    "MTPHeadConfig",
    "MTPTrainer",
    "SpeculativeGenerator",
]
