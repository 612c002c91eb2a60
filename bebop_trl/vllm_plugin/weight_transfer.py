"""`bebop_file`: a vLLM weight-transfer engine that loads weights from safetensors files, for machines without NCCL.

vLLM's built-in engines (NCCL, CUDA IPC) need GPUs. With this one, the trainer writes the policy (or the draft head)
to a folder that the server can read and names the folder in `/update_weights`; the server loads it in place, through
the same layer-wise reload as the NCCL engine. The rest of the weight-update protocol is vLLM's own: `/pause`,
`/start_weight_update` (or `/start_draft_weight_update`), `/update_weights {"update_info": {"path": ...}}`,
`/finish_weight_update`, `/resume`. Serve with `--weight-transfer-config '{"backend": "bebop_file"}'`
(`bebop-trl vllm-serve --weight_transfer file`); the trainer side is
[`FileWeightTransfer`][bebop_trl.rollout.file_weight_transfer.FileWeightTransfer].

The package's vLLM plugin registers the engine in every vLLM process; vLLM imports this module on first use.
"""

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)


@dataclass
class FileInitInfo(WeightTransferInitInfo):
    """Nothing to set up: the folder of each update is named in its update info."""


@dataclass
class FileUpdateInfo(WeightTransferUpdateInfo):
    """One update: a folder of safetensors files (or one file) the server's workers can read."""

    path: str


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, or of every safetensors file of a folder, one at a time."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"No safetensors file at {path!r}: the trainer writes the weights there first.")
    for file in files:
        with safe_open(file, "pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, handle.get_tensor(name)


def repack_tied_output_layer(model: torch.nn.Module) -> None:
    """Redoes the output layer's post-load processing when it shares its weight with the input embeddings.

    An in-place reload skips a tied `lm_head.weight` (the embeddings carry it), so it never re-runs the output layer's
    post-load processing. vLLM's CPU backend keeps a packed copy of the weight there, and without this the logits come
    from the old embeddings while the rest of the model runs the new weights. Elsewhere the processing is a no-op.
    """
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or getattr(lm_head, "quant_method", None) is None:
        return
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.quant_method.process_weights_after_loading(lm_head)


class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    """Loads each update from the safetensors files named in its update info (checkpoint names, as saved by
    `save_pretrained` or [`vllm_draft_weights`][bebop_trl.modeling.vllm_export.vllm_draft_weights])."""

    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        # An update may hold part of a model (a policy without frozen layers, a draft head), as in the NCCL engine.
        with disable_mtp_completeness_check():
            self.model.load_weights(iter_safetensors(update_info.path))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        repack_tied_output_layer(self.model)

    def shutdown(self) -> None:
        pass
