"""Export of MTP heads as vLLM draft checkpoints, and the speculative config that runs them.

The `eagle` layout is vLLM's EAGLE-1 drafter (`method="eagle"`): `fc` on cat(embedding, hidden), then the
decoder layers (the first without its input norm), no final norm, the target's embedding and lm_head shared.
vLLM builds `Eagle<Architecture>` for it: it ships `EagleLlamaForCausalLM`, and this package's vLLM plugin
([`bebop_trl.vllm_plugin`][bebop_trl.vllm_plugin]) adds the Qwen2 and Qwen3 ones. An eagle head with decoder layers of
any other architecture has no faithful vLLM drafter, and exporting it raises.
The `mtp` layout is the native MTP module of the model types in
[`NATIVE_MTP_MODEL_TYPES`][bebop_trl.modeling.NATIVE_MTP_MODEL_TYPES] (`method="mtp"`), which vLLM reads as
`mtp.*` tensors next to the target's config.

An eagle head with a draft vocabulary D exports in the form vLLM gives draft vocabularies in its EAGLE-3 drafters:
its own `lm_head.weight` over D and `d2t`, the offset of each draft id to its target id (target id = j + d2t[j]).
The drafter scores D and scatters the logits into the target vocabulary with -inf elsewhere, so that q is exactly
0 outside D, as in the torch engine. vLLM's own EAGLE-1 drafter has no draft vocabulary, so such a head is written
with the architecture `EagleDraftVocab<Architecture>`, the plugin's drafter of the same decoder layers that has one.
`method="mtp"` always scores drafts with the target's lm_head, so an mtp-layout head with a draft vocabulary does
not export.

The `eagle3` layout is vLLM's EAGLE-3 drafter (`method="eagle3"`, `Eagle3LlamaForCausalLM`): `fc` fusing the target's
hidden states at `eagle_aux_hidden_state_layer_ids`, a first layer with `hidden_norm` and 2H-wide q/k/v projections,
a final `norm`, and its own `lm_head` (over D with `d2t`, or the policy's rows over the whole vocabulary). vLLM
collects the aux hidden states of the target itself, from the layer ids of the draft's config.

Rollout drafts (`rollout_drafts=True`) run as one of vLLM's methods that draft without a model
([`rollout_drafts_speculative_config`][bebop_trl.modeling.vllm_export.rollout_drafts_speculative_config]): Suffix
Decoding (`method="suffix"`), which drafts from the request's own text and from earlier requests' outputs, where the
`arctic_inference` package is installed, else prompt lookup (`method="ngram"`), which drafts from the request's own
text only.
"""

import importlib.util
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from .configuration_mtp_head import EAGLE3_LAYOUT, EAGLE_LAYOUT, MTP_LAYOUT, MTPHeadConfig
from .hub import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, save_tensors
from .native import NATIVE_WEIGHTS_NAME, head_state_to_native


if TYPE_CHECKING:
    from .modeling_mtp_head import MTPHead


DRAFT_SAMPLING_MODES = ("probabilistic", "greedy")
"""The drafting modes of the engine, the vLLM export and `bebop-trl vllm-serve`: drafts sampled from the head's
distribution, or its argmax (vLLM's `draft_sample_method`)."""
# The architecture prefix of the plugin's EAGLE-1 drafters with a draft vocabulary (vLLM keeps a name that starts with
# "Eagle" as is, and prefixes "Eagle" to any other).
DRAFT_VOCAB_DRAFTER_PREFIX = "EagleDraftVocab"
# Policy architectures with an EAGLE-1 drafter (`Eagle<Architecture>`) of the same decoder layers in vLLM: its own
# Llama one, and the Qwen2 / Qwen3 ones of bebop_trl.vllm_plugin.
VLLM_EAGLE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# vLLM's EAGLE-3 drafter of Llama decoder layers, and the decoder model types whose layers it computes exactly.
VLLM_EAGLE3_ARCHITECTURE = "Eagle3LlamaForCausalLM"
VLLM_EAGLE3_MODEL_TYPES = ("llama",)
# The shortest and longest n-gram vLLM's prompt lookup (`method="ngram"`) matches: the match lengths of the torch
# engine's RolloutDrafter.
NGRAM_PROMPT_LOOKUP_MIN, NGRAM_PROMPT_LOOKUP_MAX = 2, 8

logger = logging.getLogger(__name__)


def vllm_method(config: MTPHeadConfig) -> str:
    """The vLLM speculative `method` that runs a head of this configuration (`"eagle"`, `"eagle3"` or `"mtp"`).

    Raises:
        ValueError: If an `mtp`-layout head has a draft vocabulary, which vLLM's MTP drafters cannot run.
    """
    _require_vllm_draft_vocabulary(config)
    return {EAGLE_LAYOUT: "eagle", EAGLE3_LAYOUT: "eagle3", MTP_LAYOUT: "mtp"}[config.layout]


def _require_vllm_draft_vocabulary(config: MTPHeadConfig) -> None:
    if config.draft_vocab_size is not None and config.layout == MTP_LAYOUT:
        raise ValueError(
            f"This mtp-layout head drafts from a {config.draft_vocab_size}-token draft vocabulary, which vLLM's MTP "
            "drafters cannot run: they score drafts with the target's full lm_head. Use rollout_backend='torch' for "
            "this head, train it without draft_vocab_size, or use the eagle layout (whose vLLM drafters take a draft "
            "vocabulary)."
        )


def vllm_speculative_config(
    head_config: MTPHeadConfig,
    draft_path: str | os.PathLike,
    *,
    num_speculative_tokens: int,
    draft_sampling: str = "probabilistic",
    rejection_sample_method: str = "standard",
) -> dict[str, Any]:
    """The `speculative_config` of `vllm.LLM` / `vllm serve --speculative-config` for an exported head.

    Args:
        head_config: Configuration of the exported head.
        draft_path: Folder written by [`export_vllm`][bebop_trl.modeling.vllm_export.export_vllm].
        num_speculative_tokens: Tokens drafted per cycle (k).
        draft_sampling: `"probabilistic"` (drafts sampled from the head; acceptance min(1, p/q)) or `"greedy"`
            (argmax drafts; vLLM's default, whose acceptance falls as the policy's entropy rises).
        rejection_sample_method: `"standard"` (token by token) or `"block"` (block verification; see
            [`require_block_verification`][bebop_trl.rollout.vllm_backend.require_block_verification] for the vLLM
            builds that implement it).

    Returns:
        A dict with `method`, `model`, `num_speculative_tokens` and `draft_sample_method`, and
        `rejection_sample_method` where it is not vLLM's default, `"standard"`.
    """
    if draft_sampling not in DRAFT_SAMPLING_MODES:
        raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING_MODES}, got {draft_sampling!r}.")
    return {
        "method": vllm_method(head_config),
        "model": os.fspath(draft_path),
        **_draft_settings(num_speculative_tokens, rejection_sample_method),
        "draft_sample_method": draft_sampling,
    }


def rollout_drafts_method() -> str:
    """The vLLM method that drafts from rollouts on this install: `"suffix"` (Suffix Decoding, which needs the
    `arctic_inference` package) where it can be imported, else `"ngram"` (prompt lookup)."""
    return "suffix" if importlib.util.find_spec("arctic_inference") is not None else "ngram"


def rollout_drafts_speculative_config(
    *, num_speculative_tokens: int, rejection_sample_method: str = "standard", method: str | None = None
) -> dict[str, Any]:
    """The `speculative_config` of vLLM rollouts drafted from rollouts instead of a head (`rollout_drafts=True`).

    `method="suffix"` is Suffix Decoding: a suffix tree per request over its prompt and output, and one over the
    outputs of earlier requests, so the other completions of a GRPO group and of earlier rounds are drafted from.
    `method="ngram"` is prompt lookup: the tokens that followed an earlier occurrence of the longest n-gram
    (`NGRAM_PROMPT_LOOKUP_MIN` to `NGRAM_PROMPT_LOOKUP_MAX` tokens) ending the request's text, found in the request's
    own prompt and output only. Neither has a draft distribution: vLLM verifies their drafts as one-hot ones, which
    keeps the output distributed as the policy's samples.

    Args:
        num_speculative_tokens: Most tokens drafted per cycle (Suffix Decoding drafts fewer where its trees predict
            few).
        rejection_sample_method: `"standard"` or `"block"`, as in
            [`vllm_speculative_config`][bebop_trl.modeling.vllm_export.vllm_speculative_config].
        method: `"suffix"` or `"ngram"`; None chooses with
            [`rollout_drafts_method`][bebop_trl.modeling.vllm_export.rollout_drafts_method] and logs the choice.
    """
    if method is None:
        method = rollout_drafts_method()
        logger.info(
            "Rollout drafts in vLLM: %s.",
            "method='suffix' (Suffix Decoding, from arctic_inference), which drafts from each request's own text and "
            "from the earlier requests' outputs: the other completions of the group and of earlier rounds"
            if method == "suffix"
            else "method='ngram' (prompt lookup), which drafts from each request's own prompt and output only, not "
            "from the other completions; `pip install arctic-inference` for method='suffix', which also drafts "
            "from them",
        )
    if method not in ("suffix", "ngram"):
        raise ValueError(f"Rollout drafts run in vLLM as method 'suffix' or 'ngram', got {method!r}.")
    config = {"method": method, **_draft_settings(num_speculative_tokens, rejection_sample_method)}
    if method == "ngram":
        config.update(prompt_lookup_min=NGRAM_PROMPT_LOOKUP_MIN, prompt_lookup_max=NGRAM_PROMPT_LOOKUP_MAX)
    return config


def _draft_settings(num_speculative_tokens: int, rejection_sample_method: str) -> dict[str, Any]:
    """The entries every speculative config has: the draft length and, where it is not vLLM's default, the
    verification (older vLLM releases have no `rejection_sample_method`)."""
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}.")
    settings: dict[str, Any] = {"num_speculative_tokens": num_speculative_tokens}
    if rejection_sample_method != "standard":
        settings["rejection_sample_method"] = rejection_sample_method
    return settings


def vllm_draft_weights(head: "MTPHead") -> dict[str, Any]:
    """The head's weights under the names vLLM's drafter loads (the form `load_weights` takes after RL updates).

    Args:
        head: An [`MTPHead`][bebop_trl.MTPHead].

    Raises:
        ValueError: If an `mtp`-layout head has a draft vocabulary, which vLLM's MTP drafters cannot run.
    """
    _require_vllm_draft_vocabulary(head.config)
    state = head.state_dict()
    if head.config.layout == MTP_LAYOUT:
        return head_state_to_native(state)
    # EAGLE names: `fc.weight` and `layers.N.*` (eagle3: the first layer's wrapped parts unwrapped, with its
    # `hidden_norm`, and `norm.weight`); the identity norms of the eagle layout hold no weights.
    weights = {
        k.removeprefix("model.").replace("layers.0.layer.", "layers.0."): v
        for k, v in state.items()
        if k not in ("draft_vocab", "draft_lm_head_weight")
    }
    if head.draft_vocab is not None:
        weights["lm_head.weight"] = head.draft_lm_head_weight
        weights["d2t"] = head.draft_vocab - torch.arange(len(head.draft_vocab), device=head.draft_vocab.device)
    elif head.config.layout == EAGLE3_LAYOUT:
        # vLLM's EAGLE-3 drafter always loads an lm_head of its own: here the policy's, over the whole vocabulary.
        weights["lm_head.weight"] = head.lm_head_weight.detach().to(head.fc.weight.dtype)
    return weights


def export_vllm(
    head: "MTPHead",
    save_directory: str | os.PathLike,
    *,
    target_config: Any = None,
    speculators_verifier: str | None = None,
    num_speculative_tokens: int = 3,
) -> str:
    """Writes `head` as a draft checkpoint that vLLM loads as is.

    `eagle` layout: `config.json` (the policy's architecture with `num_hidden_layers` = the head's layers) and
    `model.safetensors` with `fc.weight` and `layers.N.*`; with a draft vocabulary also `lm_head.weight` (its rows)
    and `d2t`, and the architecture `EagleDraftVocab<Architecture>` with `draft_vocab_size`. `mtp` layout: the target's `config.json`,
    `mtp.safetensors` with the native `mtp.*` names, and an index listing them, so that vLLM's `method="mtp"`
    reads the head from this folder instead of the target's own MTP weights. `eagle3` layout: `config.json` of
    vLLM's `Eagle3LlamaForCausalLM` (with `eagle_aux_hidden_state_layer_ids`, `draft_vocab_size`) and
    `model.safetensors` with `fc.weight`, `layers.N.*`, `norm.weight`, `lm_head.weight` and, with a draft
    vocabulary, `d2t`.

    With `speculators_verifier`, an `eagle3` head's `config.json` is written in the `speculators` format, which vLLM
    reads by itself: `vllm serve <folder>` then serves the verifier named in it with the head as its EAGLE-3 drafter,
    without this package (`--speculative-config '{"draft_sample_method": "probabilistic"}'` selects probabilistic
    drafting; without this package's vLLM plugin the build's exactness is not checked).

    Args:
        head: The [`MTPHead`][bebop_trl.MTPHead] to export (its dtype is kept).
        save_directory: Folder to write.
        target_config: For the `mtp` layout, the policy's config (`policy.config`), whose `config.json` vLLM
            needs next to the weights.
        speculators_verifier: `eagle3` layout only: the Hub id or folder of the policy that vLLM should serve with
            the head, to write the `speculators` format.
        num_speculative_tokens: With `speculators_verifier`, the draft length the format proposes.

    Returns:
        The folder, for the `model` entry of [`vllm_speculative_config`][bebop_trl.modeling.vllm_export.vllm_speculative_config].
    """
    build_config = {EAGLE_LAYOUT: _eagle_draft_config, EAGLE3_LAYOUT: _eagle3_draft_config}.get(head.config.layout)
    draft_config = build_config(head.config) if build_config else None  # validated before anything is written
    if speculators_verifier is not None:
        if head.config.layout != EAGLE3_LAYOUT:
            raise ValueError(
                f"The speculators format holds EAGLE-3 drafters; this head's layout is {head.config.layout!r}. Export "
                "it without speculators_verifier and pass vllm_speculative_config(...) to vLLM."
            )
        draft_config = _speculators_config(head.config, draft_config, speculators_verifier, num_speculative_tokens)
    weights = vllm_draft_weights(head)
    if draft_config is not None:
        os.makedirs(save_directory, exist_ok=True)
        _write_json(draft_config, os.path.join(save_directory, "config.json"))
        save_tensors(weights, os.path.join(save_directory, WEIGHTS_NAME))
        return os.fspath(save_directory)
    if target_config is None:
        raise ValueError("Exporting an `mtp`-layout head needs target_config=policy.config (vLLM reads it).")
    os.makedirs(save_directory, exist_ok=True)
    target_config.save_pretrained(save_directory)
    save_tensors(weights, os.path.join(save_directory, NATIVE_WEIGHTS_NAME))
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(weights), NATIVE_WEIGHTS_NAME)}
    _write_json(index, os.path.join(save_directory, WEIGHTS_INDEX_NAME))
    return os.fspath(save_directory)


def draft_speculative_config(
    head: "MTPHead | None",
    policy_name_or_path: str,
    draft_dir: str | os.PathLike,
    *,
    num_speculative_tokens: int,
    draft_sampling: str = "probabilistic",
    rejection_sample_method: str = "standard",
    target_config: Any = None,
    write: bool = True,
) -> dict[str, Any]:
    """Exports `head` for vLLM to `draft_dir` and returns the speculative config that drafts with it; with no head,
    the config that drafts with the MTP weights the policy checkpoint ships (vLLM reads them from the policy).

    Args:
        head: The head to draft with, or None for the policy checkpoint's native MTP weights.
        policy_name_or_path: The policy vLLM serves (Hub id or folder).
        draft_dir: Where to write the draft checkpoint.
        num_speculative_tokens: Tokens drafted per cycle.
        draft_sampling: A mode of `DRAFT_SAMPLING_MODES`.
        rejection_sample_method: `"standard"` or `"block"`.
        target_config: The policy's config, read from `policy_name_or_path` when an `mtp` head needs it and it
            is not given.
        write: False returns the config without writing (processes that let another one write).
    """
    draft = dict(
        num_speculative_tokens=num_speculative_tokens,
        draft_sampling=draft_sampling,
        rejection_sample_method=rejection_sample_method,
    )
    if head is None:
        return vllm_speculative_config(MTPHeadConfig(layout=MTP_LAYOUT), policy_name_or_path, **draft)
    if write:
        if target_config is None and head.config.layout == MTP_LAYOUT:
            from transformers import AutoConfig

            target_config = AutoConfig.from_pretrained(policy_name_or_path)
        export_vllm(head, draft_dir, target_config=target_config)
    return vllm_speculative_config(head.config, os.path.abspath(draft_dir), **draft)


def _eagle_draft_config(config: MTPHeadConfig) -> dict[str, Any]:
    draft = dict(config.decoder_config or {})
    if config.base_architecture not in VLLM_EAGLE_ARCHITECTURES:
        raise ValueError(
            f"vLLM has no EAGLE drafter with {config.base_architecture} decoder layers (drafters exist for "
            f"{', '.join(VLLM_EAGLE_ARCHITECTURES)}), so this eagle-layout head cannot run in vLLM as trained. "
            "Use rollout_backend='torch' for this policy."
        )
    draft.update(
        architectures=[config.base_architecture],
        model_type=draft.get("model_type", config.base_model_type),
        num_hidden_layers=config.num_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
    )
    if config.draft_vocab_size is not None:
        draft.update(
            architectures=[DRAFT_VOCAB_DRAFTER_PREFIX + config.base_architecture],
            draft_vocab_size=config.draft_vocab_size,
            tie_word_embeddings=False,  # its lm_head rows are its own
        )
    return draft


def _eagle3_draft_config(config: MTPHeadConfig) -> dict[str, Any]:
    if config.base_model_type not in VLLM_EAGLE3_MODEL_TYPES:
        raise ValueError(
            f"vLLM's EAGLE-3 drafter computes Llama decoder layers, but this eagle3 head's layers are "
            f"{config.base_model_type!r} ones, so it cannot run in vLLM as trained. Use rollout_backend='torch', or "
            "an eagle-layout head, for this policy."
        )
    draft = dict(config.decoder_config or {})
    draft.update(
        architectures=[VLLM_EAGLE3_ARCHITECTURE],
        model_type="llama",
        num_hidden_layers=config.num_layers,
        hidden_size=config.hidden_size,
        target_hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        draft_vocab_size=config.draft_vocab_size or config.vocab_size,
        tie_word_embeddings=False,  # its lm_head rows are its own
        # The target collects these layers' inputs; the drafter sizes `fc` by their number.
        eagle_aux_hidden_state_layer_ids=list(config.aux_layers),
        num_aux_hidden_states=len(config.aux_layers),
        eagle_config={"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(config.aux_layers)},
    )
    return draft


def _speculators_config(
    config: MTPHeadConfig, draft_config: dict[str, Any], verifier: str, num_speculative_tokens: int
) -> dict[str, Any]:
    """The `speculators` form of an eagle3 draft config: vLLM rebuilds the same `Eagle3LlamaForCausalLM` config from
    it (`transformer_layer_config` plus the EAGLE-3 fields) and its speculative config from `speculators_config`."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": EAGLE3_LAYOUT,
        "transformer_layer_config": draft_config,
        "draft_vocab_size": draft_config["draft_vocab_size"],
        "target_hidden_size": draft_config["target_hidden_size"],
        "eagle_aux_hidden_state_layer_ids": draft_config["eagle_aux_hidden_state_layer_ids"],
        # The format's default for a missing field is True; the exported drafter is vLLM's default, False.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "speculators_config": {
            "algorithm": EAGLE3_LAYOUT,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "verifier": {"name_or_path": os.fspath(verifier), "architectures": [config.base_architecture]},
        },
    }


def _write_json(data: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
