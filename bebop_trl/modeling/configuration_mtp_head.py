"""Configuration of an MTP draft head."""

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedConfig


MTP_LAYOUT = "mtp"
EAGLE_LAYOUT = "eagle"
EAGLE3_LAYOUT = "eagle3"
LAYOUTS = (MTP_LAYOUT, EAGLE_LAYOUT, EAGLE3_LAYOUT)

# Model types whose checkpoints ship MTP weights under `mtp.*` and that vLLM drafts for with `method="mtp"`.
NATIVE_MTP_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")

# Keys of a policy's config that describe how it was stored, not the architecture of its decoder layers.
_NON_ARCHITECTURE_KEYS = (
    "architectures",
    "auto_map",
    "quantization_config",
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
)


class MTPHeadConfig(PreTrainedConfig):
    """Configuration of an [`MTPHead`][bebop_trl.MTPHead].

    A head is an adapter: it holds only its own weights and names the policy it drafts for. The policy's
    embedding and lm_head are shared and never stored in the head.

    Attributes:
        base_model_name_or_path: Hub id or path of the policy the head was built for.
        base_model_type: `model_type` of the policy's text model (e.g. `"llama"`, `"qwen3"`).
        base_architecture: The policy's architecture class name (e.g. `"LlamaForCausalLM"`).
        hidden_size: The policy's hidden size.
        vocab_size: Number of rows of the policy's lm_head.
        draft_vocab_size: Size of the head's draft vocabulary, a subset of the policy's that the head drafts from
            with its own lm_head rows (stored with the head, with the subset's token ids); None drafts from the
            whole vocabulary through the policy's lm_head.
        num_layers: Number of decoder layers in the head.
        layout: `"mtp"` (RMSNorm on the embedding and on the hidden state before the 2H -> H projection, final
            norm after the block: DeepSeek-V3 / Qwen3-Next / Qwen3.5 MTP, vLLM `method="mtp"`), `"eagle"` (no
            pre-projection norms, no input norm on the first layer, no final norm: vLLM EAGLE-1, `method="eagle"`)
            or `"eagle3"` (the policy's hidden states entering `aux_layers` fused by `fc`, A*H -> H; a first layer
            whose attention reads the normed embedding and the normed hidden state side by side, 2H wide; a final
            norm before the lm_head, the next step reading the state before it: vLLM EAGLE-3, `method="eagle3"`).
        aux_layers: `eagle3` layout only: the policy layers whose input hidden states the head fuses (layer 0's
            input is the embeddings), by default [`eagle3_aux_layers`][bebop_trl.modeling.eagle3_aux_layers].
        decoder_config: The policy's text config as a dict, with `num_hidden_layers=num_layers`: the head's
            decoder layers are of the policy's own architecture.
        recipe: How the head was trained (loss, steps, data, ...), written into the model card.
        metrics: Measured figures (e.g. acceptance per position), written into the model card.
    """

    model_type = "bebop_mtp_head"

    base_model_name_or_path: str | None = None
    base_model_type: str | None = None
    base_architecture: str | None = None
    hidden_size: int = 0
    vocab_size: int = 0
    draft_vocab_size: int | None = None
    num_layers: int = 1
    layout: str = EAGLE_LAYOUT
    aux_layers: list[int] | None = None
    decoder_config: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        if self.layout not in LAYOUTS:
            raise ValueError(f"Unknown MTP head layout {self.layout!r}: use one of {LAYOUTS}.")
        if self.num_layers < 1:
            raise ValueError(f"An MTP head needs at least one decoder layer, got num_layers={self.num_layers}.")
        if (self.layout == EAGLE3_LAYOUT) != bool(self.aux_layers):
            raise ValueError(
                "aux_layers (the policy layers an EAGLE-3 head fuses) must be given for the eagle3 layout and only "
                f"for it; got layout={self.layout!r}, aux_layers={self.aux_layers!r}."
            )
        if self.aux_layers:
            check_aux_layers(self.aux_layers)
        draft_size = self.draft_vocab_size
        if draft_size is not None and (draft_size < 1 or (self.vocab_size and draft_size > self.vocab_size)):
            raise ValueError(
                f"draft_vocab_size must be None (the whole vocabulary) or in [1, vocab_size={self.vocab_size}], got "
                f"{self.draft_vocab_size}."
            )
        super().__post_init__(**kwargs)

    @classmethod
    def from_policy_config(
        cls, policy_config: PreTrainedConfig, *, num_layers: int = 1, layout: str | None = None, **kwargs: Any
    ) -> "MTPHeadConfig":
        """Builds the config of a new head for a policy.

        Args:
            policy_config: The policy's config (composite configs are reduced to their text config).
            num_layers: Number of decoder layers in the head.
            layout: `"mtp"`, `"eagle"` or `"eagle3"`; by default the layout vLLM loads as is for this policy
                (see [`default_layout`][bebop_trl.modeling.default_layout]).
            **kwargs: Further [`MTPHeadConfig`][bebop_trl.MTPHeadConfig] fields.
        """
        text_config = policy_config.get_text_config()
        decoder_config = {k: v for k, v in text_config.to_dict().items() if k not in _NON_ARCHITECTURE_KEYS}
        decoder_config["num_hidden_layers"] = num_layers
        if "layer_types" in decoder_config:
            # Draft layers attend over the whole drafted context: vLLM runs MTP/EAGLE layers as full attention.
            decoder_config["layer_types"] = ["full_attention"] * num_layers
        architectures = getattr(policy_config, "architectures", None) or [None]
        layout = layout or default_layout(text_config.model_type)
        if layout == EAGLE3_LAYOUT:
            kwargs.setdefault("aux_layers", list(eagle3_aux_layers(text_config.num_hidden_layers)))
        return cls(
            base_model_name_or_path=policy_config.name_or_path or None,
            base_model_type=text_config.model_type,
            base_architecture=architectures[0],
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            num_layers=num_layers,
            layout=layout,
            decoder_config=decoder_config,
            **kwargs,
        )


def default_layout(model_type: str) -> str:
    """The head layout vLLM can load as is for a policy of this `model_type`.

    Model types with native MTP checkpoints get the `mtp` layout (vLLM `method="mtp"`); every other target gets
    the EAGLE-1 layout (vLLM `method="eagle"`), so the head trained here is exactly the drafter vLLM runs.
    """
    return MTP_LAYOUT if model_type in NATIVE_MTP_MODEL_TYPES else EAGLE_LAYOUT


def check_aux_layers(aux_layers: Sequence[int], num_layers: int | None = None) -> None:
    """Raises `ValueError` unless `aux_layers` are increasing layer indices >= 0 (and < `num_layers`, the policy's
    layer count, when given): vLLM collects the aux hidden states in layer order."""
    layers = list(aux_layers)
    below = "" if num_layers is None else f" and < {num_layers}"
    if (
        min(layers, default=0) < 0
        or sorted(set(layers)) != layers
        or (num_layers is not None and max(layers, default=0) >= num_layers)
    ):
        raise ValueError(
            f"aux_layers must be increasing layer indices >= 0{below} of the policy (vLLM collects them in layer "
            f"order), got {layers}."
        )


def eagle3_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The low, middle and high layers whose input hidden states an EAGLE-3 head fuses, vLLM's default for a policy
    of `num_layers` decoder layers: the inputs of layers 2, num_layers // 2 and num_layers - 3 (the input of layer
    L is the output of layer L - 1, before the final norm)."""
    return 2, num_layers // 2, num_layers - 3
