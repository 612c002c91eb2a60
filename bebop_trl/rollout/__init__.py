"""Rollout backends: how trainers turn prompts into sampled completions."""

from .torch_engine import left_pad, sample_completions


__all__ = ["left_pad", "sample_completions"]
