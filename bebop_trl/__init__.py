"""bebop-trl: faster RL post-training of LLMs with multi-token-prediction speculative rollouts."""

from .modeling import MTPHead, MTPHeadConfig
from .speculative import SpeculativeGenerator
from .trainers import BebopGRPOConfig, BebopGRPOTrainer, MTPConfig, MTPTrainer


__version__ = "0.1.0.dev0"

# TRL's async GRPO trainer lives in `trl.experimental`, which warns on import: imported on first use only.
_ASYNC = {
    "BebopAsyncGRPOConfig": "bebop_trl.trainers.async_grpo_config",
    "BebopAsyncGRPOTrainer": "bebop_trl.trainers.async_grpo_trainer",
}


def __getattr__(name: str):
    if name in _ASYNC:
        import importlib

        return getattr(importlib.import_module(_ASYNC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
