"""vLLM plugin: EAGLE-1 drafters for policy architectures that vLLM ships none for, and for draft vocabularies.

vLLM runs an eagle-layout head as `Eagle<Architecture>` (the policy's architecture name with an `Eagle` prefix) and
ships that class for Llama only. This plugin registers drafters built from vLLM's own Qwen2 and Qwen3 decoder
layers, so that a head trained on such a policy runs in vLLM exactly as it was trained, and
`EagleDraftVocab<Architecture>` drafters (Llama, Qwen2, Qwen3) for heads with a reduced draft vocabulary. vLLM calls
[`register`][bebop_trl.vllm_plugin.register] in every process through the `vllm.general_plugins` entry point of
this package; nothing needs importing by hand. It also registers the `bebop_file` weight-transfer engine
([`weight_transfer`][bebop_trl.vllm_plugin.weight_transfer]) and applies, in each of those processes, the compatibility
shims named by the process that started vLLM (see [`compat`][bebop_trl.vllm_plugin.compat]).
"""

# Drafter classes by the architecture name vLLM looks up, imported lazily by vLLM (importing them needs vLLM).
EAGLE_DRAFTERS = {
    name: f"bebop_trl.vllm_plugin.eagle:{name}"
    for name in (
        "EagleQwen2ForCausalLM",
        "EagleQwen3ForCausalLM",
        # Heads with a draft vocabulary (`EagleDraftVocab<Architecture>`, see bebop_trl.modeling.vllm_export).
        "EagleDraftVocabLlamaForCausalLM",
        "EagleDraftVocabQwen2ForCausalLM",
        "EagleDraftVocabQwen3ForCausalLM",
    )
}
# The weight-transfer backend that loads updates from safetensors files (see `weight_transfer`).
FILE_WEIGHT_TRANSFER = "bebop_file"


def register() -> None:
    """Applies the compatibility shims named in `BEBOP_TRL_VLLM_SHIMS`, registers the drafters with vLLM's model
    registry, leaving any class vLLM itself ships for a name, and registers the `bebop_file` weight-transfer engine."""
    from vllm import ModelRegistry

    from .compat import apply_shims_from_environment

    apply_shims_from_environment()

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, drafter in EAGLE_DRAFTERS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, drafter)
    _register_file_weight_transfer()


def _register_file_weight_transfer() -> None:
    """Registers `bebop_file` with vLLM's weight-transfer factory, imported on first use (vLLM builds without the
    factory predate weight-transfer engines and have no use for it)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:
        return
    from .._compat import registered_weight_transfer_engines

    if FILE_WEIGHT_TRANSFER not in registered_weight_transfer_engines(WeightTransferEngineFactory):
        WeightTransferEngineFactory.register_engine(
            FILE_WEIGHT_TRANSFER, "bebop_trl.vllm_plugin.weight_transfer", "FileWeightTransferEngine"
        )
