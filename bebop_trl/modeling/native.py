"""Import and export of the MTP weights that checkpoints ship natively (Qwen3.5, Qwen3-Next: `mtp.*`)."""

import os
import re
from typing import Any

import torch
from transformers import AutoConfig

from .configuration_mtp_head import MTP_LAYOUT, NATIVE_MTP_MODEL_TYPES, MTPHeadConfig
from .hub import read_checkpoint_tensors, save_tensors


NATIVE_PREFIX = "mtp."
NATIVE_WEIGHTS_NAME = "mtp.safetensors"
# Native names of the decoder stack, and their place in the head (the rest, fc and pre-fc norms, keep their name).
_DECODER_NAMES = ("layers.", "norm.")


# Checkpoints store the experts of an MoE layer one by one (`experts.{i}.{gate,up,down}_proj.weight`); transformers
# holds them fused, as `experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and
# `experts.down_proj` [E, H, I]. vLLM reads the per-expert names.
_EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


NATIVE_HEAD = "native"
"""The `mtp_head` value of the trainer configs that names the MTP weights the policy's own checkpoint ships."""


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> transformers' fused `gate_up_proj` / `down_proj` (others pass through)."""
    fused, experts = {}, {}
    for key, tensor in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            fused[key] = tensor
        else:
            experts.setdefault(match["experts"], {})[int(match["index"]), match["proj"]] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(index for index, _ in parts)
        missing = [
            f"{i}.{p}" for i in range(count) for p in ("gate_proj", "up_proj", "down_proj") if (i, p) not in parts
        ]
        if missing:
            raise ValueError(f"The checkpoint's {prefix} lack {missing[:5]}: it is incomplete or corrupt.")
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[i, "gate_proj"], parts[i, "up_proj"]]) for i in range(count)]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([parts[i, "down_proj"] for i in range(count)])
    return fused


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of [`fuse_experts`][bebop_trl.modeling.native.fuse_experts]: fused expert tensors -> per-expert ones."""
    split = {}
    for key, tensor in tensors.items():
        if key.endswith(".experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for i, gate_up in enumerate(tensor):
                gate, up = gate_up.chunk(2)
                split[f"{prefix}.{i}.gate_proj.weight"], split[f"{prefix}.{i}.up_proj.weight"] = (
                    gate.clone(),
                    up.clone(),
                )
        elif key.endswith(".experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            split.update({f"{prefix}.{i}.down_proj.weight": down.clone() for i, down in enumerate(tensor)})
        else:
            split[key] = tensor
    return split


def head_state_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head's state dict under the checkpoint's native `mtp.*` names, experts one by one."""
    return split_experts({head_to_native_key(k): v for k, v in state.items()})


def native_to_head_key(key: str) -> str:
    """`mtp.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`; `mtp.fc.weight` -> `fc.weight`."""
    name = key.removeprefix(NATIVE_PREFIX)
    return f"model.{name}" if name.startswith(_DECODER_NAMES) else name


def head_to_native_key(key: str) -> str:
    """Inverse of [`native_to_head_key`][bebop_trl.modeling.native.native_to_head_key]."""
    return NATIVE_PREFIX + key.removeprefix("model.")


def read_native_head(
    policy_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> tuple[MTPHeadConfig, dict[str, torch.Tensor], str]:
    """The head config and weights (under the head's names) of the `mtp.*` tensors a policy checkpoint ships.

    Args:
        policy_name_or_path: Folder or Hub id of the policy checkpoint.
        **hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only` (unset ones left out).

    Returns:
        `(config, state_dict, source)`, `source` naming where the weights came from for error messages.
    """
    hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
    policy_config = AutoConfig.from_pretrained(policy_name_or_path, **hub_kwargs)
    text_config = policy_config.get_text_config()
    if text_config.model_type not in NATIVE_MTP_MODEL_TYPES:
        raise ValueError(
            f"{policy_name_or_path} is a {text_config.model_type!r} checkpoint, which ships no MTP weights "
            f"(native MTP: {', '.join(NATIVE_MTP_MODEL_TYPES)}). Build a new head with MTPHead.from_model(policy)."
        )
    native = _read_native_tensors(policy_name_or_path, hub_kwargs)
    layer_ids = {int(k.split(".")[2]) for k in native if k.startswith(NATIVE_PREFIX + "layers.")}
    num_layers = getattr(text_config, "mtp_num_hidden_layers", None) or len(layer_ids)
    config = MTPHeadConfig.from_policy_config(policy_config, num_layers=num_layers, layout=MTP_LAYOUT)
    config.base_model_name_or_path = str(policy_name_or_path)
    state = {native_to_head_key(k): v for k, v in fuse_experts(native).items()}
    return config, state, f"the mtp.* tensors of {policy_name_or_path}"


def _read_native_tensors(path_or_repo, hub_kwargs) -> dict:
    native = read_checkpoint_tensors(path_or_repo, lambda key: key.startswith(NATIVE_PREFIX), **hub_kwargs)
    if not native:
        raise ValueError(
            f"{path_or_repo} has no MTP weights (no `{NATIVE_PREFIX}*` tensors). "
            "Build a new head with MTPHead.from_model(policy)."
        )
    return native


def save_native_weights(head, save_directory: str | os.PathLike) -> str:
    """Writes `head`'s weights under native `mtp.*` names to `save_directory/mtp.safetensors`."""
    if head.config.layout != MTP_LAYOUT:
        raise ValueError(
            f"Only `mtp`-layout heads have native `mtp.*` names; this head has layout {head.config.layout!r}."
        )
    if head.config.draft_vocab_size is not None:
        raise ValueError(
            "Native MTP weights draft through the model's own lm_head over its whole vocabulary, so a head with a "
            f"draft vocabulary ({head.config.draft_vocab_size} tokens) has no native form. Save it with "
            "save_pretrained, or build the head without draft_vocab."
        )
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, NATIVE_WEIGHTS_NAME)
    save_tensors(head_state_to_native(head.state_dict()), path)
    return path
