"""The MTP draft head: a small recurrent module on the policy's last hidden state."""

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from .configuration_mtp_head import EAGLE3_LAYOUT, MTP_LAYOUT, MTPHeadConfig
from .hub import (
    CONFIG_NAME,
    LIBRARY_NAME,
    WEIGHTS_NAME,
    head_model_card,
    load_tensors,
    read_json,
    resolve_file,
    save_tensors,
)
from .model_inputs import cache_of, with_cache
from .native import read_native_head, save_native_weights
from .vllm_export import export_vllm


logger = logging.getLogger(__name__)


@dataclass
class MTPHeadOutput:
    """Output of one head step.

    Attributes:
        last_hidden_state: [B, T, H] the head's final hidden state: [`compute_logits`][bebop_trl.MTPHead.compute_logits]
            turns it into draft logits (the `eagle3` layout applies its final norm there), and it is the
            hidden-state input of the next draft step.
        past_key_values: The head's own KV cache (when `use_cache`).
    """

    last_hidden_state: torch.Tensor
    past_key_values: Cache | None = None


class MTPHead(nn.Module, ModelHubMixin, library_name=LIBRARY_NAME):
    """Multi-token-prediction draft head, stored as an adapter of its policy.

    Step 1 reads the policy's final hidden state `h_t` (after its final norm) and the embedding of token
    `x_{t+1}`, concatenates them (embedding first), projects 2H -> H, runs one or a few decoder layers of the
    policy's own architecture and predicts `x_{t+2}` with the policy's lm_head. Step j feeds the head's own output
    hidden state and the embedding of `x_{t+j}` back in, with the same weights. The `mtp` layout adds RMSNorms
    before the projection and after the block; the `eagle` layout has neither. The `eagle3` layout reads the
    hidden states entering a low, a middle and a high layer of the policy instead of its final one, fuses them
    through `fc` once ([`policy_input`][bebop_trl.MTPHead.policy_input]), and its first layer's attention reads
    the normed embedding and the normed hidden state side by side (see [`MTPHeadConfig`][bebop_trl.MTPHeadConfig]).

    The embedding and lm_head are the policy's: shared, frozen, never stored in the head. [`bind`][bebop_trl.MTPHead.bind]
    attaches a head to its policy after checking that they match.

    A head may instead draft from a subset D of the vocabulary (`draft_vocab` in
    [`from_model`][bebop_trl.MTPHead.from_model]), which makes its lm_head product |D| / V as costly. It then holds
    its own frozen lm_head rows for D, copied from the policy's when it is built and saved with it, and the sorted
    target ids of D. [`compute_logits`][bebop_trl.MTPHead.compute_logits] still returns logits over the whole
    vocabulary, -inf outside D, so the draft probability of every token outside D is exactly 0 and rejection
    sampling stays exact: the policy's mass outside D is simply never accepted.

    Example:
        ```python
        head = MTPHead.from_model(policy)          # new head, bound to `policy`
        head.save_pretrained("my-head")            # config.json + model.safetensors + README.md
        head = MTPHead.from_pretrained("my-head", policy=policy)

        # A head drafting from the 8192 tokens that carry most of the policy's mass on its own samples.
        draft_vocab = select_draft_vocab(policy.config.vocab_size, sequences=samples, size=8192)
        head = MTPHead.from_model(policy, draft_vocab=draft_vocab)
        ```
    """

    config_class = MTPHeadConfig

    def __init__(self, config: MTPHeadConfig):
        super().__init__()
        self.config = config
        decoder_config = dict(config.decoder_config or {})
        model_type = decoder_config.pop("model_type", config.base_model_type)
        if model_type is None:
            raise ValueError(
                "MTPHeadConfig.decoder_config has no model_type: build the config with from_policy_config."
            )
        # The head reads embeddings from the policy, so its decoder stack needs no vocabulary of its own.
        decoder_config.update(
            vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None, num_hidden_layers=config.num_layers
        )
        decoder = AutoModel.from_config(AutoConfig.for_model(model_type, **decoder_config))
        if not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
            raise ValueError(
                f"Cannot build an MTP head for model type {model_type!r}: its base model has no `layers`/`norm`. "
                "Use a decoder-only causal LM policy."
            )
        decoder.embed_tokens = None
        hidden_size = config.hidden_size
        if config.layout == EAGLE3_LAYOUT:
            self.fc = nn.Linear(len(config.aux_layers) * hidden_size, hidden_size, bias=False)
            decoder.layers[0] = Eagle3InputLayer(decoder.layers[0], hidden_size)
            # Applied before the lm_head only: the next draft step reads the state before it.
            self.norm = decoder.norm
            decoder.norm = nn.Identity()
        else:
            self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        if config.layout == MTP_LAYOUT:
            self.pre_fc_norm_embedding = copy.deepcopy(decoder.norm)
            self.pre_fc_norm_hidden = copy.deepcopy(decoder.norm)
        elif config.layout != EAGLE3_LAYOUT:
            # EAGLE-1: the projection feeds the first layer's attention directly and its output goes to the lm_head.
            decoder.layers[0].input_layernorm = nn.Identity()
            decoder.norm = nn.Identity()
        self.model = decoder
        # Buffers, not parameters: like the policy's lm_head, the draft rows are frozen, so no optimizer, noise or
        # `requires_grad_(True)` over the head's parameters may touch them; they still move and save with the head.
        draft_size = config.draft_vocab_size
        self.register_buffer("draft_vocab", None if draft_size is None else torch.zeros(draft_size, dtype=torch.long))
        self.register_buffer(
            "draft_lm_head_weight", None if draft_size is None else torch.zeros(draft_size, hidden_size)
        )
        self._policy_io: tuple[nn.Module, nn.Module] | None = None

    # ----------------------------------------------------------------------------------------------------- policy

    def bind(self, policy: nn.Module, *, check_base_model: bool = True) -> "MTPHead":
        """Checks that the head matches `policy` and shares the policy's embedding and lm_head with it.

        The policy's modules are referenced, not copied: updates of the policy's weights are seen at once.

        Args:
            policy: The causal LM the head drafts for (a PEFT or accelerate wrapper is fine).
            check_base_model: Also require the policy's name to match the head's `base_model_name_or_path`.

        Returns:
            The head itself.

        Raises:
            ValueError: If hidden size, vocabulary, architecture or base model do not match.
        """
        self.validate_policy(policy, check_base_model=check_base_model)
        # A plain attribute (not a submodule): the policy's weights stay out of the head's state dict.
        object.__setattr__(self, "_policy_io", (policy.get_input_embeddings(), policy.get_output_embeddings()))
        return self

    def validate_policy(self, policy: nn.Module, *, check_base_model: bool = True) -> None:
        """Raises `ValueError` naming both values if the head was not built for a policy like `policy`.

        Args:
            policy: The causal LM to check against.
            check_base_model: Also compare the policy's name with the head's `base_model_name_or_path`.
        """
        text_config = policy.config.get_text_config()
        head = self.config
        built_for = head.base_model_name_or_path or "another policy"
        fix = "Load the head trained for this policy, or build one with MTPHead.from_model(policy)."
        if head.hidden_size != text_config.hidden_size:
            raise ValueError(
                f"MTP head hidden size {head.hidden_size} does not match the policy's hidden size "
                f"{text_config.hidden_size} (the head was built for {built_for}). {fix}"
            )
        num_layers = text_config.num_hidden_layers
        if head.aux_layers and max(head.aux_layers) >= num_layers:
            raise ValueError(
                f"This eagle3 head reads the policy's layers {head.aux_layers}, but the policy has {num_layers} "
                f"layers (the head was built for {built_for}). {fix}"
            )
        lm_head = policy.get_output_embeddings()
        policy_vocab = lm_head.weight.shape[0] if lm_head is not None else text_config.vocab_size
        if head.vocab_size != policy_vocab:
            raise ValueError(
                f"MTP head vocabulary size {head.vocab_size} does not match the policy's lm_head rows {policy_vocab} "
                f"(the head was built for {built_for}). {fix}"
            )
        if head.base_model_type and head.base_model_type != text_config.model_type:
            raise ValueError(
                f"MTP head architecture {head.base_model_type!r} ({head.base_architecture}) does not match the "
                f"policy's {text_config.model_type!r}. {fix}"
            )
        policy_name = policy.config.name_or_path
        if check_base_model and not _same_model_name(head.base_model_name_or_path, policy_name):
            raise ValueError(
                f"MTP head was built for base model {head.base_model_name_or_path!r}, but the policy is "
                f"{policy_name!r}. {fix} If the policy is a fine-tune of that model, pass check_base_model=False."
            )

    @property
    def is_bound(self) -> bool:
        """Whether the head shares a policy's embedding and lm_head (see [`bind`][bebop_trl.MTPHead.bind])."""
        return self._policy_io is not None

    def _bound_io(self) -> tuple[nn.Module, nn.Module]:
        if self._policy_io is None:
            raise RuntimeError("This MTP head is not bound to a policy: call head.bind(policy) first.")
        return self._policy_io

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The policy's lm_head weight [V, H] (shared and frozen).

        It scores the policy's side of a head loss. A head with a draft vocabulary drafts with its own rows
        `draft_lm_head_weight` [|D|, H] for the target ids `draft_vocab` [|D|] (both None otherwise), which
        [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] takes as its `draft_lm_head_weight` and `draft_vocab`.
        """
        return self._bound_io()[1].weight

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embeds token ids with the policy's input embedding (detached: head losses never train the policy)."""
        return self._bound_io()[0](input_ids).detach()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., V] over the whole vocabulary, from head hidden states [..., H].

        With a draft vocabulary, the logits outside it are -inf, so softmax, sampling and argmax give those tokens
        probability exactly 0.
        """
        return self.to_vocabulary(self.compute_draft_logits(hidden_states), fill=float("-inf"))

    def to_vocabulary(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-token values over the draft vocabulary [..., |D|] placed in the whole vocabulary [..., V], `fill`
        elsewhere (-inf for logits, 0 for probabilities); as is without a draft vocabulary."""
        if self.draft_vocab is None:
            return values
        full = values.new_full((*values.shape[:-1], self.config.vocab_size), fill)
        return full.index_copy_(-1, self.draft_vocab, values)

    def compute_draft_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft logits over the head's draft vocabulary: [..., |D|], column j for token `draft_vocab[j]`.

        The cheap form of [`compute_logits`][bebop_trl.MTPHead.compute_logits] for callers that map draft indices to
        token ids themselves; without a draft vocabulary it is the same [..., V] logits.
        """
        hidden_states = self.output_norm(hidden_states)
        if self.draft_lm_head_weight is None:
            lm_head = self._bound_io()[1]
            return lm_head(hidden_states.to(lm_head.weight.dtype))
        return nn.functional.linear(hidden_states.to(self.draft_lm_head_weight.dtype), self.draft_lm_head_weight)

    def output_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's hidden states as its lm_head reads them: after the final norm for the `eagle3` layout (whose
        next draft step reads the state before it), as they are for the other layouts."""
        return self.norm(hidden_states) if self.config.layout == EAGLE3_LAYOUT else hidden_states

    @property
    def aux_layers(self) -> tuple[int, ...] | None:
        """The policy layers whose input hidden states the head reads (`eagle3` layout), or None: the head reads
        the policy's final hidden state."""
        return tuple(self.config.aux_layers) if self.config.aux_layers else None

    def policy_input(self, final_hidden: torch.Tensor, aux_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden-state input [..., H] of a first draft step from what the policy computed at that position.

        Args:
            final_hidden: [..., H] the policy's final hidden states (what the `eagle` and `mtp` layouts read).
            aux_hidden: [..., A * H] the hidden states entering the policy's `aux_layers`, concatenated in their
                order (see [`policy_hidden_states`][bebop_trl.modeling.teacher_forcing.policy_hidden_states]);
                the `eagle3` layout fuses them through `fc`.

        Raises:
            ValueError: If an `eagle3` head gets no `aux_hidden`, or one of the wrong width.
        """
        if self.config.layout != EAGLE3_LAYOUT:
            return final_hidden
        if aux_hidden is None or aux_hidden.shape[-1] != self.fc.in_features:
            got = None if aux_hidden is None else aux_hidden.shape[-1]
            raise ValueError(
                f"An eagle3 head reads the hidden states entering the policy's layers {list(self.aux_layers)}, "
                f"concatenated ({self.fc.in_features} wide), got width {got}. Compute them with "
                "policy_hidden_states(policy, ids, mask, head.aux_layers), or build the corpus with "
                "aux_layers=head.aux_layers."
            )
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def policy_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """[`policy_input`][bebop_trl.MTPHead.policy_input] from the `hidden_states` of a transformers forward with
        `output_hidden_states=True` (entry L is the input of layer L; the last, the final hidden state)."""
        aux = None if self.aux_layers is None else torch.cat([hidden_states[i] for i in self.aux_layers], dim=-1)
        return self.policy_input(hidden_states[-1], aux)

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> MTPHeadOutput:
        """Runs one draft step over a sequence of slots.

        For step 1, `hidden_states[:, t]` is the policy's input at position t (see
        [`policy_input`][bebop_trl.MTPHead.policy_input]: its final hidden state, or the `eagle3` layout's fused
        layers) and `input_ids[:, t]` is token t+1; for step j > 1, `hidden_states` is the previous step's
        `last_hidden_state`. The slots run
        causally in parallel (teacher forcing), or one by one with `past_key_values` when drafting.

        Args:
            hidden_states: [B, T, H] policy (step 1) or head (later steps) hidden states.
            input_ids: [B, T] ids of the next tokens, embedded with the policy's embedding.
            inputs_embeds: [B, T, H] the same tokens already embedded (instead of `input_ids`).
            attention_mask: [B, past + T] validity of the slots (1 = attend). Slot t pairs the hidden state at
                position t with token t+1, so with left padding it is the policy's mask shifted by one slot.
            position_ids: [B, T] positions of the slots; only differences matter (rotary embeddings), so the
                policy's positions of the hidden states or of the tokens both work if used consistently.
            past_key_values: The head's KV cache from earlier calls (see [`new_cache`][bebop_trl.MTPHead.new_cache]).
            use_cache: Return the updated cache.

        Returns:
            The head's final hidden states and its cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds to the MTP head.")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        dtype = self.fc.weight.dtype
        inputs_embeds, hidden_states = inputs_embeds.to(dtype), hidden_states.to(dtype)
        if self.config.layout == EAGLE3_LAYOUT:
            # The first layer splits the pair again: it norms each half and keeps the hidden state as residual.
            projected = torch.cat([inputs_embeds, hidden_states], dim=-1)
        else:
            if self.config.layout == MTP_LAYOUT:
                inputs_embeds = self.pre_fc_norm_embedding(inputs_embeds)
                hidden_states = self.pre_fc_norm_hidden(hidden_states)
            projected = self.fc(torch.cat([inputs_embeds, hidden_states], dim=-1))
        out = self.model(
            inputs_embeds=projected,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **with_cache(past_key_values),
            use_cache=use_cache,
        )
        return MTPHeadOutput(out.last_hidden_state, cache_of(out) if use_cache else None)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for drafting with this head."""
        return DynamicCache(config=self.model.config)

    # -------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_model(
        cls,
        policy: PreTrainedModel,
        num_layers: int = 1,
        layout: str | None = None,
        *,
        init_from_policy: bool = True,
        draft_vocab: torch.Tensor | list[int] | None = None,
        **config_kwargs: Any,
    ) -> "MTPHead":
        """Builds a new head for `policy`, bound to it.

        The head starts as the identity on the policy's hidden state, so that its first draft distribution is the
        policy's own next-token distribution, at the right scale, and TV-family losses get a useful gradient from
        the first step: the projection passes the hidden-state half through and starts the embedding half at zero;
        the decoder layers copy the policy's last decoder layers (where shapes allow) with the output projections
        of their residual branches (`o_proj`, `down_proj`) set to zero; the `mtp` final norm copies the policy's
        final norm. Copying a layer with its branches on would feed the policy's residual-stream scale to the
        lm_head without the final norm (eagle layout) and make the first drafts near-deterministic and wrong.

        Args:
            policy: The causal LM to draft for.
            num_layers: Number of decoder layers in the head.
            layout: `"mtp"` or `"eagle"`; by default the layout vLLM loads as is for this policy.
            init_from_policy: Initialise from the policy as above; otherwise keep the architecture's random init.
            draft_vocab: Target token ids the head drafts from (sorted, each once; e.g. from
                [`select_draft_vocab`][bebop_trl.modeling.draft_vocab.select_draft_vocab]), or None for the whole
                vocabulary. The head copies the policy's lm_head rows of these tokens, frozen, whatever
                `init_from_policy` says: they are the policy's lm_head over D.
            **config_kwargs: Further [`MTPHeadConfig`][bebop_trl.MTPHeadConfig] fields (e.g. `recipe`).

        Raises:
            ValueError: If `draft_vocab` is not a sorted, duplicate-free 1-D list of ids of the policy's vocabulary.
        """
        if "draft_vocab_size" in config_kwargs:
            raise ValueError("Pass the draft vocabulary itself as draft_vocab=ids; its size follows from it.")
        config = MTPHeadConfig.from_policy_config(policy.config, num_layers=num_layers, layout=layout, **config_kwargs)
        lm_head = policy.get_output_embeddings()
        if lm_head is not None:
            config.vocab_size = lm_head.weight.shape[0]
        if draft_vocab is not None:
            if lm_head is None:
                raise ValueError(
                    "A draft vocabulary needs the policy's lm_head rows, but the policy exposes no lm_head."
                )
            draft_vocab = _checked_draft_vocab(draft_vocab, config.vocab_size, source="draft_vocab")
            config.draft_vocab_size = len(draft_vocab)
        if config.base_architecture is None:  # built from a config and not saved yet: name it as saving would
            base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
            config.base_architecture = type(base).__name__
        head = cls(config)
        if init_from_policy:
            head._init_from_policy(policy)
        if draft_vocab is not None:
            with torch.no_grad():
                head.draft_vocab.copy_(draft_vocab)
                head.draft_lm_head_weight.copy_(lm_head.weight[draft_vocab.to(lm_head.weight.device)])
        reference = policy.get_input_embeddings().weight
        head.to(device=reference.device, dtype=reference.dtype)
        return head.bind(policy)

    @torch.no_grad()
    def with_draft_vocab(self, draft_vocab: torch.Tensor | list[int]) -> "MTPHead":
        """A copy of this full-vocabulary head that drafts from `draft_vocab` only, bound to the same policy.

        The copy keeps this head's layers and takes the policy's lm_head rows of the subset, so its draft
        distribution is this head's renormalised over the subset: a trained head gets a cheaper draft step with no
        retraining (the [benchmarks](../benchmarks.md) measure what the subset costs in acceptance).

        Args:
            draft_vocab: Target token ids to draft from (sorted, each once), e.g. from
                [`select_draft_vocab`][bebop_trl.modeling.draft_vocab.select_draft_vocab].

        Raises:
            ValueError: If this head already has a draft vocabulary, or `draft_vocab` is not a sorted,
                duplicate-free list of ids of the policy's vocabulary.
        """
        if self.draft_vocab is not None:
            raise ValueError(
                f"This head already drafts from a {self.config.draft_vocab_size}-token draft vocabulary; restrict the "
                "full-vocabulary head it was made from instead."
            )
        lm_head = self._bound_io()[1]
        draft_vocab = _checked_draft_vocab(draft_vocab, self.config.vocab_size, source="draft_vocab")
        config = copy.deepcopy(self.config)
        config.draft_vocab_size = len(draft_vocab)
        head = type(self)(config)
        head.load_state_dict(self.state_dict(), strict=False)  # the layers; the draft buffers are set next
        head.draft_vocab.copy_(draft_vocab)
        head.draft_lm_head_weight.copy_(lm_head.weight[draft_vocab.to(lm_head.weight.device)])
        reference = self.fc.weight
        head.to(device=reference.device, dtype=reference.dtype).train(self.training)
        head._policy_io = self._policy_io
        return head

    @torch.no_grad()
    def _init_from_policy(self, policy: PreTrainedModel) -> None:
        hidden_size = self.config.hidden_size
        self.fc.weight.zero_()
        # The hidden-state half (eagle, mtp), or the highest fused layer (eagle3), passes through.
        self.fc.weight[:, -hidden_size:].copy_(torch.eye(hidden_size))
        decoder = policy_decoder(policy)
        if decoder is None:
            logger.warning("The policy exposes no decoder layers; the MTP head keeps its random initialisation.")
            return
        sources = list(decoder.layers)
        for head_layer in reversed(self.model.layers):
            # Copy from the deepest policy layer whose parameters have the same names and shapes (hybrid models
            # interleave layer kinds, e.g. linear and full attention).
            while sources and not (
                head_layer.init_from(sources[-1])
                if isinstance(head_layer, Eagle3InputLayer)
                else _copy_matching(sources[-1], head_layer)
            ):
                sources.pop()
            if not sources:
                logger.warning("No policy decoder layer matches the head's layers; they keep their random init.")
                break
            sources.pop()
        if self.config.layout == MTP_LAYOUT:
            _copy_matching(decoder.norm, self.model.norm)
        elif self.config.layout == EAGLE3_LAYOUT:
            _copy_matching(decoder.norm, self.norm)
        zeroed = [m for n, m in self.model.layers.named_modules() if n.endswith(_RESIDUAL_OUTPUT_PROJECTIONS)]
        if not zeroed:
            logger.warning("Found no o_proj/down_proj in the head's layers: their residual branches start as copied.")
        for projection in zeroed:
            projection.weight.zero_()
            if getattr(projection, "bias", None) is not None:
                projection.bias.zero_()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        policy: nn.Module | None = None,
        check_base_model: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> "MTPHead":
        """Loads a head saved with [`save_pretrained`][bebop_trl.MTPHead.save_pretrained] from a folder or the Hub.

        Args:
            pretrained_model_name_or_path: A local folder or a Hub repo id.
            policy: If given, the head is checked against it and bound to it.
            check_base_model: With `policy`, also require the policy's name to match the head's base model.
            dtype: Cast the weights to this dtype (default: as stored).
            device: Move the head to this device (default: the policy's device, else CPU).
            revision: Hub revision.
            token: Hub token.
            cache_dir: Hub cache folder.
            local_files_only: Do not download.

        Raises:
            OSError: If a file is missing, corrupt or truncated.
            ValueError: If the checkpoint is not an MTP head, its weights do not fit its config, or it does not
                match `policy`.
        """
        hub_kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        config_dict = read_json(resolve_file(pretrained_model_name_or_path, CONFIG_NAME, **hub_kwargs))
        model_type = config_dict.get("model_type")
        if model_type != MTPHeadConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not an MTP head checkpoint (model_type={model_type!r}). "
                "To import the MTP weights a model checkpoint ships, use MTPHead.from_native(path_or_repo)."
            )
        config = MTPHeadConfig.from_dict(config_dict)
        state = load_tensors(resolve_file(pretrained_model_name_or_path, WEIGHTS_NAME, **hub_kwargs))
        head = cls(config)
        head.load_head_state_dict(state, source=str(pretrained_model_name_or_path))
        return head.place(policy, dtype=dtype, device=device, check_base_model=check_base_model)

    def place(
        self,
        policy: nn.Module | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_base_model: bool = True,
    ) -> "MTPHead":
        """Moves the head to `device` and `dtype`, and binds it to `policy` if given.

        Args:
            policy: The causal LM to check the head against and share the embedding and lm_head with.
            dtype: Cast the weights to this dtype (default: keep).
            device: Move the head to this device (default: the policy's device, else keep).
            check_base_model: With `policy`, also require the policy's name to match the head's base model.

        Returns:
            The head itself.
        """
        if device is None and policy is not None:
            device = policy.get_input_embeddings().weight.device
        self.to(device=device, dtype=dtype)
        return self if policy is None else self.bind(policy, check_base_model=check_base_model)

    def load_head_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
        """Loads head weights exactly (the head takes the stored dtype), with a clear error on any mismatch.

        Args:
            state: Tensors keyed as in `head.state_dict()`.
            source: Where the tensors come from, for error messages.
        """
        expected = self.state_dict()
        configured = self.config.draft_vocab_size
        stored = len(state["draft_vocab"]) if "draft_vocab" in state else None
        if stored != configured:
            if configured is None:
                problem = f"have a draft vocabulary of {stored} tokens, but its config has no draft_vocab_size"
            elif stored is None:
                problem = f"have no draft vocabulary, but its config says draft_vocab_size={configured}"
            else:
                problem = (
                    f"have a draft vocabulary of {stored} tokens, but its config says draft_vocab_size={configured}"
                )
            raise ValueError(
                f"The weights in {source} {problem}: config.json and the weights file come from different heads. "
                "Save the head again with save_pretrained."
            )
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [
            f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"The weights in {source} do not fit the head's config: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong_shape[:5]}. The weights file and config.json come from "
                "different heads; save the head again."
            )
        # The draft vocabulary's ids are integers: the head's dtype is that of its floating-point weights.
        stored_dtype = next(v for v in state.values() if v.is_floating_point()).dtype
        self.to(stored_dtype)
        if configured is not None:
            _checked_draft_vocab(state["draft_vocab"], self.config.vocab_size, source=f"the draft_vocab of {source}")
        self.load_state_dict(state, strict=True)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Saves the head as an adapter repo: `config.json`, `model.safetensors` and a `README.md` model card.

        Only the head's own weights are saved (never the policy's embedding or lm_head), always as safetensors. A
        head with a draft vocabulary also saves its lm_head rows and their target ids (`draft_lm_head_weight`,
        `draft_vocab`): they are the head's, no longer the policy's. The Hub side (this method's `push_to_hub`,
        and [`push_to_hub`][bebop_trl.MTPHead.push_to_hub] itself) is `huggingface_hub`'s `ModelHubMixin`.

        Args:
            save_directory: Folder to write (created if needed).
            push_to_hub: Also upload the folder to the Hub repo `repo_id`.
            repo_id: The Hub repo (default: the folder's name).
            **push_to_hub_kwargs: Passed to `push_to_hub` (`private`, `token`, `branch`, `create_pr`, ...).

        Returns:
            The commit's URL with `push_to_hub`, else None.
        """
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, repo_id=repo_id, **push_to_hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload MTP head",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        delete_patterns: list[str] | str | None = None,
        **kwargs: Any,
    ) -> str:
        """Uploads the head (the files of [`save_pretrained`][bebop_trl.MTPHead.save_pretrained]) to a Hub repo in one
        commit, creating the repo if needed (`huggingface_hub`'s `ModelHubMixin.push_to_hub`).

        Args:
            repo_id: The repo, e.g. `"my-org/SmolLM2-135M-Instruct-mtp-head"`.
            commit_message: Message of the commit.
            private: Create the repo as private (ignored if it exists).
            token: Hub token (default: the logged-in user's).
            branch: Branch to push to (default: `main`).
            create_pr: Open a pull request instead of committing to the branch.
            delete_patterns: Remote files to delete in the same commit (e.g. a stale `*.bin`).
            **kwargs: Other arguments of `ModelHubMixin.push_to_hub` (`allow_patterns`, `ignore_patterns`).

        Returns:
            The commit's URL.
        """
        return super().push_to_hub(
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            branch=branch,
            create_pr=create_pr,
            delete_patterns=delete_patterns,
            **kwargs,
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        # The mixin writes the model card (generate_model_card) and uploads; config and weights are the head's.
        self.config.save_pretrained(save_directory)
        save_tensors(self.state_dict(), os.path.join(save_directory, WEIGHTS_NAME))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The head's model card: Hub metadata (base model, tags), usage, the head's table, recipe and metrics."""
        return head_model_card(self.config)

    # ------------------------------------------------------------------------------------------------ native MTP

    @classmethod
    def from_native(
        cls,
        policy_name_or_path: str | os.PathLike,
        *,
        policy: nn.Module | None = None,
        check_base_model: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> "MTPHead":
        """Imports the MTP weights a checkpoint ships (Qwen3.5 / Qwen3-Next `mtp.*` tensors) as a head.

        Args:
            policy_name_or_path: Folder or Hub id of the policy checkpoint.
            policy: The policy to bind the head to, as in [`from_pretrained`][bebop_trl.MTPHead.from_pretrained].
            check_base_model: As in `from_pretrained`.
            dtype: As in `from_pretrained`.
            device: As in `from_pretrained`.
            revision: Hub revision.
            token: Hub token.
            cache_dir: Hub cache folder.
            local_files_only: Do not download.
        """
        config, state, source = read_native_head(
            policy_name_or_path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
        head = cls(config)
        head.load_head_state_dict(state, source=source)
        return head.place(policy, dtype=dtype, device=device, check_base_model=check_base_model)

    def save_native(self, save_directory: str | os.PathLike) -> str:
        """Writes the head's weights under the checkpoint's native `mtp.*` names (inverse of `from_native`).

        Args:
            save_directory: Folder to write `mtp.safetensors` into.

        Returns:
            The path of the written file.
        """
        return save_native_weights(self, save_directory)

    def export_vllm(
        self,
        save_directory: str | os.PathLike,
        *,
        target_config: Any = None,
        speculators_verifier: str | None = None,
        num_speculative_tokens: int = 3,
    ) -> str:
        """Writes the head as a vLLM draft checkpoint (see [`export_vllm`][bebop_trl.modeling.vllm_export.export_vllm]).

        Args:
            save_directory: Folder to write.
            target_config: The policy's config; needed for the `mtp` layout.
            speculators_verifier: `eagle3` heads: the policy to name in the `speculators` format, which
                `vllm serve <folder>` runs without this package.
            num_speculative_tokens: With `speculators_verifier`, the draft length the format proposes.

        Returns:
            The folder, to use as the `model` of [`vllm_speculative_config`][bebop_trl.modeling.vllm_export.vllm_speculative_config]
            (or, in the `speculators` format, as the model vLLM serves).
        """
        return export_vllm(
            self,
            save_directory,
            target_config=target_config,
            speculators_verifier=speculators_verifier,
            num_speculative_tokens=num_speculative_tokens,
        )


# The last linear map of each residual branch of a decoder layer (attention, MLP or experts), by its usual name.
_RESIDUAL_OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


def policy_decoder(policy: nn.Module) -> nn.Module | None:
    """The module holding the policy's decoder `layers` and final `norm` (PEFT wrappers unwrapped)."""
    if hasattr(policy, "get_base_model"):
        policy = policy.get_base_model()
    decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else None
    return decoder if decoder is not None and hasattr(decoder, "layers") and hasattr(decoder, "norm") else None


class Eagle3InputLayer(nn.Module):
    """EAGLE-3's first draft layer around a decoder layer of the policy's architecture.

    It takes the token embedding and the hidden state side by side ([..., 2H], embedding first), norms each with its
    own RMSNorm (`layer.input_layernorm` and `hidden_norm`), and its attention projects the 2H-wide pair; the
    residual stream is the hidden state. The rest is the wrapped layer's: residual adds, post-attention norm, MLP.

    Args:
        layer: A decoder layer with `input_layernorm`, `self_attn.{q,k,v}_proj`, `post_attention_layernorm` and
            `mlp` (Llama, Qwen and similar); its q/k/v projections are replaced by 2H-wide ones.
        hidden_size: The hidden size H.

    Raises:
        ValueError: If the layer does not have these parts.
    """

    def __init__(self, layer: nn.Module, hidden_size: int):
        super().__init__()
        attention = getattr(layer, "self_attn", None)
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if (
            attention is None
            or not all(hasattr(attention, f"{x}_proj") for x in "qkv")
            or not all(hasattr(layer, part) for part in parts)
        ):
            raise ValueError(
                f"An eagle3 head needs decoder layers with self_attn.q_proj/k_proj/v_proj, {', '.join(parts)} "
                f"(Llama, Qwen); {type(layer).__name__} has not. Use the eagle layout for this policy."
            )
        for name in ("q_proj", "k_proj", "v_proj"):
            projection = getattr(attention, name)
            wide = nn.Linear(2 * hidden_size, projection.out_features, bias=projection.bias is not None)
            setattr(attention, name, wide)
        self.layer = layer
        self.hidden_norm = copy.deepcopy(layer.input_layernorm)
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One layer step on [..., 2H] (embedding, hidden state) pairs; `kwargs` go to the attention as the
        wrapped layer passes them (mask, positions, cache, rotary embeddings)."""
        embeds, hidden = hidden_states.split(self.hidden_size, dim=-1)
        layer = self.layer
        pair = torch.cat([layer.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attended, _ = layer.self_attn(hidden_states=pair, **kwargs)
        hidden = hidden + attended
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> bool:
        """Copies a policy decoder layer of the same architecture: every same-shaped parameter as is, its q/k/v
        projections into the hidden-state half of the wide ones (the embedding half starts at zero), and its input
        norm into `hidden_norm` too. Returns False, copying nothing, if the layers do not match."""
        src, dst = source.state_dict(), self.layer.state_dict()
        wide = {k for k in dst if k.startswith("self_attn.") and k.endswith("_proj.weight") and "o_proj" not in k}
        if not all(k in src and (src[k].shape == v.shape or k in wide) for k, v in dst.items()):
            return False
        if not all(dst[k].shape == (src[k].shape[0], 2 * src[k].shape[1]) for k in wide):
            return False
        state = {k: src[k] for k in dst if k not in wide}
        for k in wide:
            state[k] = torch.cat([torch.zeros_like(src[k]), src[k]], dim=1)
        self.layer.load_state_dict(state)
        self.hidden_norm.load_state_dict(source.input_layernorm.state_dict())
        return True


def _copy_matching(source: nn.Module, target: nn.Module) -> bool:
    """Copies `source`'s parameters into `target` if every target parameter has a same-named, same-shaped twin."""
    src, dst = source.state_dict(), target.state_dict()
    if not all(k in src and src[k].shape == v.shape for k, v in dst.items()):
        return False
    target.load_state_dict({k: src[k] for k in dst})
    return True


def _checked_draft_vocab(ids: torch.Tensor | list[int], vocab_size: int, *, source: str) -> torch.LongTensor:
    """`ids` as a LongTensor, after checking that they are a valid draft vocabulary of a `vocab_size` vocabulary.

    Raises:
        ValueError: Naming `source`, what is wrong and how to fix it.
    """
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:
        raise ValueError(f"{source} is empty: a draft vocabulary needs at least one token.")
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(
            f"{source} must be a 1-D list or tensor of integer token ids, got {ids.dtype} of shape {tuple(ids.shape)}."
        )
    ids = ids.long()
    if (ids[1:] <= ids[:-1]).any():
        raise ValueError(f"{source} must be sorted with each id once: pass torch.unique(ids), which sorts them.")
    if ids[0] < 0 or ids[-1] >= vocab_size:
        outside = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"{source} holds ids outside the policy's vocabulary [0, {vocab_size}) (e.g. {outside[0].item()}): it "
            "was chosen for another tokenizer or model. Choose it again for this policy."
        )
    return ids


def _same_model_name(a: str | None, b: str | None) -> bool:
    """Whether two model names or paths refer to the same model (a Hub id matches a local folder of that name)."""
    if not a or not b:
        return True

    def canonical(name: str) -> str:
        return os.path.basename(os.path.normpath(str(name))).lower()

    return canonical(a) == canonical(b)
