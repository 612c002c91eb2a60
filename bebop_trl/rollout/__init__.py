"""Rollout backends: how trainers turn prompts into sampled completions, log-probs and acceptance counts."""

from .base import RolloutBackend, RolloutResult
from .engine_backend import BackgroundEngineRollout, EngineRollout
from .torch_engine import left_pad, sample_completions


__all__ = [
    "BackgroundEngineRollout",
    "EngineRollout",
    "RolloutBackend",
    "RolloutResult",
    "left_pad",
    "sample_completions",
]
