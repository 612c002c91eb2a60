"""EAGLE-1 drafters with Qwen2 / Qwen3 decoder layers, in the form of vLLM's own `EagleLlamaForCausalLM`, and
drafters of all three architectures with a draft vocabulary.

The forward is the eagle layout of [`MTPHead`][bebop_trl.MTPHead]: `fc` on cat(embedding, hidden), the decoder
layers (the first without its input norm), no final norm; vLLM shares the target's embedding and lm_head with it.
A drafter with a draft vocabulary D keeps its own lm_head rows over D instead, and the target id of each row in
`draft_id_to_target_id` (target id = j + d2t[j], the form of vLLM's EAGLE-3 drafters).
"""

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_draft_quant_config,
    maybe_prefix,
    process_eagle_weight,
)


class _EagleModel(nn.Module):
    """`fc` and the decoder layers of an EAGLE-1 drafter; `decoder_layer` is set by the subclasses."""

    decoder_layer: type[nn.Module]
    # The checkpoint stores q/k/v and gate/up separately; vLLM's layers hold them fused.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0) -> None:
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        quant_config = get_draft_quant_config(vllm_config)
        # Replaced by the target's embedding when the checkpoint has none (vLLM's proposer shares it).
        self.embed_tokens = VocabParallelEmbedding(
            self.config.vocab_size, self.config.hidden_size, prefix=maybe_prefix(prefix, "embed_tokens")
        )
        # Layer names continue the target's numbering: attention layers (and their KV caches) are keyed by name.
        self.layers = nn.ModuleList(
            self.decoder_layer(
                self.config,
                cache_config=vllm_config.cache_config,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, f"layers.{i + start_layer_id}"),
            )
            for i in range(self.config.num_hidden_layers)
        )
        # EAGLE-1: the projection feeds the first layer's attention directly.
        self.layers[0].input_layernorm = nn.Identity()
        self.fc = ReplicatedLinear(
            input_size=2 * self.config.hidden_size,
            output_size=self.config.hidden_size,
            bias=False,
            params_dtype=vllm_config.model_config.dtype,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "fc"),
            return_bias=False,
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.fc(torch.cat((self.embed_tokens(input_ids), hidden_states), dim=-1))
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        # No final norm: the sum goes to the lm_head, and is the hidden state of the next draft step.
        hidden_states = hidden_states + residual
        return hidden_states, hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


@support_torch_compile
class _EagleQwen2Model(_EagleModel):
    decoder_layer = Qwen2DecoderLayer


@support_torch_compile
class _EagleQwen3Model(_EagleModel):
    decoder_layer = Qwen3DecoderLayer


class _EagleDrafterMixin:
    """The causal-LM wrapper vLLM's EAGLE proposer drives; the target class it is mixed into supplies the eagle
    interface flags and `compute_logits` (over the lm_head the proposer shares)."""

    model_class: type[_EagleModel]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        if getattr(self.config, "draft_vocab_size", None) is None:
            self.config.draft_vocab_size = self.config.vocab_size
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = self.model_class(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), start_layer_id=target_layers
        )
        self.logits_processor = LogitsProcessor(self.config.vocab_size, scale=getattr(self.config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError(f"{type(self).__name__} takes token ids, not input embeddings.")
        return self.model(input_ids, positions, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def to_module_name(item: tuple[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
            name, tensor = item
            if "lm_head" not in name:
                name = "model." + name
            process_eagle_weight(self, name)  # notes an own embedding / lm_head, which vLLM then keeps
            return name, tensor

        AutoWeightsLoader(self).load_weights(map(to_module_name, weights))


class EagleQwen2ForCausalLM(_EagleDrafterMixin, Qwen2ForCausalLM):
    """EAGLE-1 drafter with Qwen2 decoder layers (q/k/v biases)."""

    model_class = _EagleQwen2Model


class EagleQwen3ForCausalLM(_EagleDrafterMixin, Qwen3ForCausalLM):
    """EAGLE-1 drafter with Qwen3 decoder layers (q/k norms)."""

    model_class = _EagleQwen3Model


class _DraftVocabularyMixin:
    """An EAGLE-1 drafter's own lm_head over its draft vocabulary D, and the offsets `draft_id_to_target_id` of D's
    target ids (the checkpoint's `lm_head.weight` and `d2t`).

    `compute_logits` scatters the draft logits into the target vocabulary with -inf outside D, so that vLLM's
    proposer samples drafts with q exactly 0 outside D and its rejection sampler compares full-vocabulary p and q,
    as the torch engine does. vLLM keeps the drafter's lm_head because the checkpoint has one.
    """

    config: Any

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        size = self.config.draft_vocab_size
        self.lm_head = ParallelLMHead(size, self.config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(size, scale=getattr(self.config, "logit_scale", 1.0))
        self.draft_id_to_target_id = nn.Parameter(torch.zeros(size, dtype=torch.long), requires_grad=False)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        draft_logits = self.logits_processor(self.lm_head, hidden_states)
        offsets = self.draft_id_to_target_id
        target_ids = offsets + torch.arange(len(offsets), device=offsets.device)
        logits = draft_logits.new_full((draft_logits.shape[0], self.config.vocab_size), float("-inf"))
        return logits.index_copy_(-1, target_ids, draft_logits)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rest = []
        for name, tensor in weights:
            if name == "d2t":
                self.draft_id_to_target_id.copy_(tensor)
            else:
                rest.append((name, tensor))
        super().load_weights(rest)


class EagleDraftVocabLlamaForCausalLM(_DraftVocabularyMixin, EagleLlamaForCausalLM):
    """vLLM's EAGLE-1 Llama drafter with a draft vocabulary."""


class EagleDraftVocabQwen2ForCausalLM(_DraftVocabularyMixin, EagleQwen2ForCausalLM):
    """EAGLE-1 drafter with Qwen2 decoder layers and a draft vocabulary."""


class EagleDraftVocabQwen3ForCausalLM(_DraftVocabularyMixin, EagleQwen3ForCausalLM):
    """EAGLE-1 drafter with Qwen3 decoder layers and a draft vocabulary."""
