"""The part of a policy a head needs when its hidden states come from a corpus: embedding, lm_head, last layers."""

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .hub import read_checkpoint_tensors
from .modeling_mtp_head import policy_decoder


def load_policy_io(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    num_last_layers: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> PreTrainedModel:
    """The policy with only its input embedding, lm_head, final norm and last decoder layers read from the checkpoint.

    The other decoder layers stay on the meta device: they are never allocated nor read (with a sharded checkpoint,
    only the shards holding the loaded tensors are downloaded). This is what head training on a self-distilled corpus
    needs: the head shares the embedding and lm_head, a new head copies the last layers and the final norm, and the
    hidden states come with the data. Running the returned model raises, since its other layers hold no data.

    Args:
        pretrained_model_name_or_path: A local folder or a Hub repo id of a causal LM.
        num_last_layers: Decoder layers to load, from the last (what a new head of that many layers copies).
        dtype: Dtype of the loaded tensors.
        device: Where the loaded tensors go (the rest stays on the meta device).
        revision: Hub revision.
        token: Hub token.
        cache_dir: Hub cache folder.
        local_files_only: Do not download.

    Raises:
        ValueError: If the checkpoint lacks a tensor to load, naming it.
    """
    hub_kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **{k: v for k, v in hub_kwargs.items() if v})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = str(pretrained_model_name_or_path)
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    decoder = policy_decoder(model)
    if decoder is not None:
        modules += [decoder.norm, *list(decoder.layers)[-num_last_layers:]] if num_last_layers else [decoder.norm]
    names = {id(module): name for name, module in model.named_modules()}
    wanted = {
        f"{names[id(module)]}.{param_name}": (module, param_name)
        for module in modules
        for param_name, _ in module.named_parameters()
    }
    tied = {id(model.get_input_embeddings().weight)} & {id(model.get_output_embeddings().weight)}
    tensors = read_checkpoint_tensors(pretrained_model_name_or_path, wanted.__contains__, **hub_kwargs)
    for key, (module, param_name) in wanted.items():
        if key not in tensors:
            if tied and module is model.get_output_embeddings():
                continue  # the lm_head is the embedding: loaded under the embedding's name
            raise ValueError(
                f"{pretrained_model_name_or_path} has no tensor {key!r}, which the head needs. Load the whole policy "
                "with AutoModelForCausalLM.from_pretrained instead."
            )
        owner, leaf = _owner(module, param_name)
        setattr(owner, leaf, nn.Parameter(tensors[key].to(dtype=dtype, device=device), requires_grad=False))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.eval().requires_grad_(False)


def _owner(module: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """The submodule holding a dotted parameter name, and the parameter's own name."""
    *path, leaf = param_name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf
