"""bebop-trl: faster RL post-training of LLMs with multi-token-prediction speculative rollouts."""

from typing import TYPE_CHECKING

from .modeling import MTPHead, MTPHeadConfig
from .speculative import SpeculativeGenerator


if TYPE_CHECKING:
    from .trainers import BebopGRPOConfig, BebopGRPOTrainer, MTPConfig, MTPTrainer
    from .trainers.async_grpo_config import BebopAsyncGRPOConfig
    from .trainers.async_grpo_trainer import BebopAsyncGRPOTrainer


__version__ = "0.1.0.dev0"

# The trainers import trl, which the engine, the heads and the loss op do not need (a machine with torch and
# transformers only can run them); TRL's async GRPO trainer lives in `trl.experimental`, which warns on import. So the
# trainers are imported on first use only.
_LAZY = {
    "BebopAsyncGRPOConfig": "bebop_trl.trainers.async_grpo_config",
    "BebopAsyncGRPOTrainer": "bebop_trl.trainers.async_grpo_trainer",
    "BebopGRPOConfig": "bebop_trl.trainers",
    "BebopGRPOTrainer": "bebop_trl.trainers",
    "MTPConfig": "bebop_trl.trainers",
    "MTPTrainer": "bebop_trl.trainers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BebopAsyncGRPOConfig",
    "BebopAsyncGRPOTrainer",
    "BebopGRPOConfig",
    "BebopGRPOTrainer",
    "MTPConfig",
    "MTPHead",
    "MTPHeadConfig",
    "MTPTrainer",
    "SpeculativeGenerator",
]
