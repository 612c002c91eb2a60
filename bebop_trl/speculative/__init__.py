"""Speculative decoding with an MTP draft head: sampling helpers, exact rejection sampling and the engine."""

from .counts import AcceptanceCounts
from .engine import DRAFT_SAMPLING_MODES, GenerationOutput, SpeculativeGenerator
from .rejection import REJECTION_SAMPLE_METHODS, rejection_sample
from .rollout_drafts import RolloutDrafter
from .sampling import probs_from_logits, process_logits, sample, validate_sampling_params
from .stats import AcceptanceStats


__all__ = [
    "DRAFT_SAMPLING_MODES",
    "REJECTION_SAMPLE_METHODS",
    "AcceptanceCounts",
    "AcceptanceStats",
    "GenerationOutput",
    "RolloutDrafter",
    "SpeculativeGenerator",
    "probs_from_logits",
    "process_logits",
    "rejection_sample",
    "sample",
    "validate_sampling_params",
]
