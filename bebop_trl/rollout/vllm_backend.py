"""Rollouts with vLLM: the MTP head as vLLM's drafter, in TRL's colocate and server modes.

TRL's `VLLMGeneration` builds the colocated `vllm.LLM` with fixed arguments; [`speculative_llm`][bebop_trl.rollout.vllm_backend.speculative_llm]
adds the speculative config to that one call. Acceptance is read from vLLM's cumulative spec-decode counters
(`LLM.get_metrics()` in colocate mode, the server's `/metrics` endpoint in server mode), differenced per round.
"""

import contextlib
import functools
import typing
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .._compat import vllm_model_runner as _model_runner
from ..speculative import AcceptanceCounts
from ..vllm_plugin import compat


# Speculative methods of this package that vLLM's Model Runner V2 does not run (vLLM 0.32:
# `VllmConfig._get_v2_model_runner_unsupported_features`); vLLM falls back to its V1 model runner for them.
V1_ONLY_METHODS = ("suffix",)
# vLLM's cumulative counters; the server's Prometheus text adds the `_total` suffix of counters.
NUM_DRAFTS = "vllm:spec_decode_num_drafts"
NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"
_COUNTER_FIELDS = {
    NUM_DRAFTS: "num_drafts",
    NUM_DRAFT_TOKENS: "num_draft_tokens",
    NUM_ACCEPTED_TOKENS: "num_accepted_tokens",
}


def counts_from_llm_metrics(metrics: Iterable[Any]) -> AcceptanceCounts:
    """vLLM's cumulative spec-decode counters (summed over engines) from `vllm.LLM.get_metrics()`, a list of
    `Counter` / `Vector` snapshots; subtract two readings to get a round's."""
    counts = AcceptanceCounts()
    for metric in metrics:
        if metric.name == ACCEPTED_PER_POSITION:
            counts += _positions_sample(dict(enumerate(metric.values)))
        else:
            counts += _counter_sample(metric.name, getattr(metric, "value", 0))
    return counts


def counts_from_prometheus_text(text: str) -> AcceptanceCounts:
    """vLLM's cumulative spec-decode counters from a server's `/metrics` page (Prometheus text format)."""
    counts = AcceptanceCounts()
    for line in text.splitlines():
        if not line.startswith("vllm:spec_decode_num"):
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_and_labels.partition("{")
        name = name.removesuffix("_total")
        if name == ACCEPTED_PER_POSITION:
            position = _label(labels, "position")
            if position is not None:
                counts += _positions_sample({int(position): float(value)})
        else:
            counts += _counter_sample(name, float(value))
    return counts


def _counter_sample(name: str, value: float) -> AcceptanceCounts:
    """One engine's sample of a scalar counter (empty for a counter that is not a spec-decode count)."""
    attribute = _COUNTER_FIELDS.get(name)
    return AcceptanceCounts(**{attribute: int(value)}) if attribute is not None else AcceptanceCounts()


def _positions_sample(values: dict[int, float]) -> AcceptanceCounts:
    """One engine's sample of the accepted-per-position counter, {position: count}."""
    positions = [0] * (max(values, default=-1) + 1)
    for position, count in values.items():
        positions[position] = int(count)
    return AcceptanceCounts(accepted_per_position=positions)


def _label(labels: str, key: str) -> str | None:
    for pair in labels.rstrip("}").split(","):
        name, _, value = pair.partition("=")
        if name.strip() == key:
            return value.strip().strip('"')
    return None


def read_server_counters(base_url: str, timeout: float = 10.0) -> AcceptanceCounts:
    """The cumulative spec-decode counters of a running `vllm serve` (or `bebop-trl vllm-serve`) at `base_url`."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout) as response:
        return counts_from_prometheus_text(response.read().decode("utf-8"))


@contextlib.contextmanager
def speculative_llm(speculative_config: dict[str, Any]) -> Iterator[None]:
    """Makes TRL's colocated `vllm.LLM(...)` call also pass `speculative_config` and keep its statistics on.

    TRL builds the engine in `VLLMGeneration._init_vllm` with fixed keyword arguments; within this context that
    module's `LLM` is a partial application of vLLM's with the two extra arguments.
    """
    from trl.generation import vllm_generation

    original = vllm_generation.LLM
    vllm_generation.LLM = functools.partial(original, speculative_config=speculative_config, disable_log_stats=False)
    try:
        yield
    finally:
        vllm_generation.LLM = original


def block_verification_unsupported(method: str, engine_config: Any = None) -> str | None:
    """Why the installed vLLM would not verify drafts of `method` as a block, or None where it would.

    vLLM implements `rejection_sample_method="block"` in the rejection sampler of its Model Runner V2 only
    (`vllm/v1/worker/gpu/spec_decode/rejection_sampler.py`, Triton kernels). The V1 model runner's rejection sampler
    (`vllm/v1/sample/rejection_sampler.py`) implements "standard" and "synthetic": it accepts "block", verifies token
    by token, and its drafters then keep no draft probabilities, so probabilistic drafting turns greedy. vLLM runs V2
    where Triton has a backend for the device, `VLLM_USE_V2_MODEL_RUNNER` is not 0 and the method is one V2 runs.

    Args:
        method: The speculative config's `method`.
        engine_config: A built engine's `VllmConfig`: its choice of model runner is then read, not predicted.
    """
    from vllm.config import speculative

    if "block" not in typing.get_args(getattr(speculative, "RejectionSampleMethod", None)):
        return "it has no block verification"
    if engine_config is not None:
        return None if getattr(engine_config, "use_v2_model_runner", False) else "its engine runs the V1 model runner"
    from vllm import envs
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        return "Triton has no backend for its device, so it runs the V1 model runner"
    if getattr(envs, "VLLM_USE_V2_MODEL_RUNNER", None) is False:
        return "VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 model runner"
    if method in V1_ONLY_METHODS:
        return f"its Model Runner V2 does not run method={method!r}, so it runs the V1 model runner"
    return None


def require_block_verification(method: str, engine_config: Any = None) -> None:
    """Refuses `rejection_sample_method="block"` where the installed vLLM would not verify drafts as a block (see
    [`block_verification_unsupported`][bebop_trl.rollout.vllm_backend.block_verification_unsupported]); without
    vLLM it does nothing (the exactness guard refuses that).

    Raises:
        ValueError: With the reason, the build and the ways out.
    """
    build = compat.installed_vllm_build()
    reason = None if build is None else block_verification_unsupported(method, engine_config)
    if reason is not None:
        raise ValueError(
            f"rejection_sample_method='block' with rollout_backend='vllm' needs vLLM's Model Runner V2, whose "
            f"rejection sampler is the only one of vLLM's to implement block verification. The installed {build} "
            f"would not use it ({reason}) and would verify token by token instead. Use rollout_backend='torch' "
            "(block verification in the torch engine) or rejection_sample_method='standard'."
        )


def sync_colocated_policy(generation: Any, fallback: Callable[[], None]) -> None:
    """TRL's colocated policy weight sync, through vLLM's in-place reload where vLLM has it.

    Since vLLM 0.32 some backends (the CPU one among them) repack weights after loading, and the live model's
    `load_weights`, which `VLLMGeneration.sync_weights` calls, no longer accepts checkpoint tensors;
    `reload_weights` loads them and repeats the post-load processing, except for an output layer tied to the
    embeddings, which is repacked here. Older vLLM keeps TRL's own path.

    Args:
        generation: TRL's `VLLMGeneration` in colocate mode.
        fallback: TRL's own `sync_weights` of `generation`.
    """
    from ..vllm_plugin.weight_transfer import repack_tied_output_layer

    runner = _model_runner(generation.llm)
    if not hasattr(runner, "reload_weights"):
        fallback()
        return
    if generation.enable_sleep_mode:
        generation.llm.wake_up(tags=["weights"])
        generation._llm_weights_sleeping = False
    runner.reload_weights(weights_iterator=generation._iter_named_params())
    repack_tied_output_layer(runner.get_model())
    generation.llm.reset_prefix_cache()


def route_policy_sync_through_reload(generation: Any) -> None:
    """Makes TRL's colocated `generation.sync_weights()` (called before every generation) run
    [`sync_colocated_policy`][bebop_trl.rollout.vllm_backend.sync_colocated_policy], TRL's own sync as its fallback."""
    trl_sync = generation.sync_weights
    generation.sync_weights = lambda: sync_colocated_policy(generation, fallback=trl_sync)


def load_colocated_draft_weights(llm: Any, weights: dict[str, torch.Tensor]) -> None:
    """Loads head weights (named as in the exported draft checkpoint) into a colocated `vllm.LLM`'s drafter.

    Args:
        llm: The in-process `vllm.LLM`, built with a speculative config.
        weights: From [`vllm_draft_weights`][bebop_trl.modeling.vllm_export.vllm_draft_weights].
    """
    runner = _model_runner(llm)
    draft = runner.get_draft_model()
    if draft is None:
        raise RuntimeError("This vLLM engine has no draft model: it was built without a speculative_config.")
    try:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights
    except ImportError:  # vLLM without in-place reload: the draft still has its weight loaders
        draft.load_weights(list(weights.items()))
        return
    reload_weights(runner.vllm_config, draft, iter(weights.items()), weights_path=None, is_checkpoint_format=True)
    llm.reset_prefix_cache()


def push_draft_weights_to_server(client: Any, weights: dict[str, torch.Tensor]) -> None:
    """Streams head weights into the drafter of a `vllm serve` server with vLLM's draft weight update.

    One update session: `/start_draft_weight_update` points the server's weight-transfer engine at the drafter, the
    tensors go over TRL's weight-transfer group (NCCL, set up by TRL for the policy sync), `/finish_weight_update`
    closes it. The server must run in vLLM's dev mode with a weight-transfer engine, as `bebop-trl vllm-serve`
    starts it.

    Args:
        client: TRL's `VLLMClient` of the trainer's main process, with its communicator initialised.
        weights: From [`vllm_draft_weights`][bebop_trl.modeling.vllm_export.vllm_draft_weights] (the names of the
            exported draft checkpoint), on the trainer's device.
    """
    metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in weights.items()]
    # TRL's client opens a policy session around `update_named_params` unless one is open: mark the draft session as
    # the open one (`weight_update()` does the same for the policy).
    client._post(f"{client.base_url}/start_draft_weight_update", json={})
    client._updating_weights = True
    try:
        client.update_named_params(metadata, iter(weights.items()))
    finally:
        client._updating_weights = False
        client._post(f"{client.base_url}/finish_weight_update", json={})
