"""MTP draft heads: configuration, construction, draft vocabularies, checkpoints, native MTP import/export."""

from .configuration_mtp_head import (
    EAGLE3_LAYOUT,
    EAGLE_LAYOUT,
    MTP_LAYOUT,
    NATIVE_MTP_MODEL_TYPES,
    MTPHeadConfig,
    default_layout,
    eagle3_aux_layers,
)
from .draft_vocab import draft_vocab_mass, estimate_token_mass, select_draft_vocab
from .modeling_mtp_head import MTPHead, MTPHeadOutput


__all__ = [
    "EAGLE3_LAYOUT",
    "EAGLE_LAYOUT",
    "MTP_LAYOUT",
    "NATIVE_MTP_MODEL_TYPES",
    "MTPHead",
    "MTPHeadConfig",
    "MTPHeadOutput",
    "default_layout",
    "draft_vocab_mass",
    "eagle3_aux_layers",
    "estimate_token_mass",
    "select_draft_vocab",
]
