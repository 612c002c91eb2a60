"""Shared fixtures: tiny checkpoints written once per test session and loaded through `from_pretrained`."""

import os


# Before anything imports huggingface_hub: tests never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl.testing import TINY_ARCHITECTURES, save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Folder of a tiny checkpoint (model + character tokenizer) per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_checkpoint(root / f"tiny-{arch}", arch) for arch in (*TINY_ARCHITECTURES, "qwen3_5")}


@pytest.fixture(scope="session")
def load_tiny(tiny_checkpoints):
    """Loads a fresh copy of a tiny model: `load_tiny("qwen3")`."""

    def load(architecture: str = "llama", dtype: torch.dtype = torch.float32):
        return AutoModelForCausalLM.from_pretrained(tiny_checkpoints[architecture], dtype=dtype).eval()

    return load


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: the tiny models are overhead-bound, so one thread is faster, and far
    faster on a busy machine. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
