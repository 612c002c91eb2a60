"""MTP draft heads: configuration, construction, adapter-style checkpoints and native MTP import/export."""

from .configuration_mtp_head import EAGLE_LAYOUT, MTP_LAYOUT, NATIVE_MTP_MODEL_TYPES, MTPHeadConfig, default_layout
from .modeling_mtp_head import MTPHead, MTPHeadOutput


__all__ = [
    "EAGLE_LAYOUT",
    "MTP_LAYOUT",
    "NATIVE_MTP_MODEL_TYPES",
    "MTPHead",
    "MTPHeadConfig",
    "MTPHeadOutput",
    "default_layout",
]
