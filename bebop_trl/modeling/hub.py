"""File resolution, safetensors I/O and model cards for head checkpoints."""

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils import cached_file


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_CARD_NAME = "README.md"
LIBRARY_NAME = "bebop-trl"


def resolve_file(path_or_repo: str | os.PathLike, filename: str, *, required: bool = True, **hub_kwargs) -> str | None:
    """Returns the local path of `filename` in a local folder or a Hub repo (downloaded and cached).

    Args:
        path_or_repo: A local folder or a Hub repo id.
        filename: The file inside it.
        required: Raise `OSError` when the file is missing; otherwise return None.
        **hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, forwarded to the Hub download.
    """
    path_or_repo = str(path_or_repo)
    if os.path.isdir(path_or_repo):
        local = os.path.join(path_or_repo, filename)
        if os.path.isfile(local):
            return local
        if required:
            raise OSError(f"{path_or_repo} has no file named {filename}.")
        return None
    try:
        return cached_file(
            path_or_repo,
            filename,
            _raise_exceptions_for_missing_entries=required,
            _raise_exceptions_for_connection_errors=required,
            **{k: v for k, v in hub_kwargs.items() if v is not None},
        )
    except OSError as e:
        raise OSError(
            f"Cannot get {filename} from {path_or_repo!r} (not a local folder, so tried the Hub): {e}"
        ) from e


def load_tensors(file: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Reads tensors from a safetensors file on CPU, with a clear error for a corrupt or truncated file.

    Args:
        file: Path of the `.safetensors` file.
        keys: Only these tensors (all when None).
    """
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except (SafetensorError, OSError) as e:
        raise OSError(
            f"Cannot read weights from {file}: the file is corrupt or truncated ({e}). "
            "Download or save the checkpoint again."
        ) from e


def read_checkpoint_tensors(
    path_or_repo: str | os.PathLike, select: Callable[[str], bool], **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly sharded) safetensors checkpoint whose names `select` accepts.

    With a sharded checkpoint only the shards that hold a selected tensor are downloaded and read.

    Args:
        path_or_repo: A local folder or a Hub repo id.
        select: Whether to read the tensor of this name.
        **hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`.
    """
    index_file = resolve_file(path_or_repo, WEIGHTS_INDEX_NAME, required=False, **hub_kwargs)
    keys_by_file: dict[str, list[str] | None] = {}
    if index_file is not None:
        for key, file in read_json(index_file)["weight_map"].items():
            if select(key):
                keys_by_file.setdefault(file, []).append(key)
    else:
        keys_by_file[WEIGHTS_NAME] = None  # one file: read its selected keys below
    tensors = {}
    for file, keys in keys_by_file.items():
        local = resolve_file(path_or_repo, file, **hub_kwargs)
        if keys is None:
            with safe_open(local, framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if select(k)]  # noqa: SIM118 (a safetensors handle: no `in`)
        tensors.update(load_tensors(local, keys))
    return tensors


def save_tensors(tensors: dict[str, torch.Tensor], file: str) -> None:
    """Writes tensors to a safetensors file (contiguous CPU copies; never pickle)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def read_json(file: str) -> dict[str, Any]:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def head_model_card(config) -> ModelCard:
    """Builds the model card of a head from its config (recipe and measured figures included when known)."""
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=config.base_model_name_or_path,
        tags=[LIBRARY_NAME, "mtp-head", "speculative-decoding", f"layout-{config.layout}"],
        pipeline_tag="text-generation",
    )
    base = config.base_model_name_or_path or "the policy it was built for"
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# MTP draft head for {base}",
        "",
        f"A multi-token-prediction draft head for speculative rollouts with `{LIBRARY_NAME}`. It holds only the "
        "head's own weights: the embedding and the lm_head are the policy's, shared and frozen.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from bebop_trl import MTPHead, SpeculativeGenerator",
        "",
        f'policy = AutoModelForCausalLM.from_pretrained("{config.base_model_name_or_path or "<base model>"}")',
        'head = MTPHead.from_pretrained("<this repo>", policy=policy)',
        "generator = SpeculativeGenerator(policy, head, num_speculative_tokens=3)",
        "```",
        "",
        "## Head",
        "",
        "| field | value |",
        "|---|---|",
        f"| layout | `{config.layout}` |",
        f"| decoder layers | {config.num_layers} (`{config.base_model_type}`) |",
        f"| hidden size | {config.hidden_size} |",
        f"| vocabulary | {config.vocab_size} |",
        *([f"| draft vocabulary | {config.draft_vocab_size} tokens |"] if config.draft_vocab_size is not None else []),
        f"| base architecture | `{config.base_architecture}` |",
    ]
    for title, table in (("Training recipe", config.recipe), ("Measured", config.metrics)):
        if table:
            lines += ["", f"## {title}", "", "| field | value |", "|---|---|"]
            lines += [f"| {key} | {value} |" for key, value in table.items()]
    return ModelCard("\n".join(lines) + "\n")
