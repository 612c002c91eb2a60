"""Tiny, locally built models and a character-level tokenizer for tests and examples (no hub access needed).

Every model has head_dim 32, which the CPU build of vLLM supports, so the same checkpoints serve every test lane.
"""

import json
import os
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_next import Qwen3NextConfig

from .modeling import MTPHead
from .modeling.hub import WEIGHTS_INDEX_NAME, read_json, save_tensors


TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3")
TINY_VOCAB_SIZE = 128
TINY_HIDDEN_SIZE = 64
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII, newline, tab) with a ChatML chat template."""
    specials = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
    )


def tiny_config(architecture: str = "llama", **overrides: Any) -> PreTrainedConfig:
    """Config of a 2-layer causal LM with hidden size 64, 2 heads of dim 32 and a 128-token vocabulary.

    Args:
        architecture: `"llama"`, `"qwen2"`, `"qwen3"`, `"qwen3_5"` (text-only Qwen3.5: one linear-attention and
            one full-attention layer) or `"qwen3_next"` (the same layer types, with mixture-of-experts MLPs: 4
            experts, 2 per token, and a shared expert).
        **overrides: Config fields to change.
    """
    tokenizer = char_tokenizer()
    common = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        # Larger than the usual 0.02 so that a random model's next-token distributions are far from uniform.
        initializer_range=0.15,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config_classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "qwen3_5": Qwen3_5TextConfig,
        "qwen3_next": Qwen3NextConfig,
    }
    if architecture not in config_classes:
        raise ValueError(f"Unknown tiny architecture {architecture!r}: use one of {sorted(config_classes)}.")
    if architecture == "llama":
        common["tie_word_embeddings"] = True  # like SmolLM2
    if architecture in ("qwen3_5", "qwen3_next"):
        common.update(
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            mtp_num_hidden_layers=1,
        )
    if architecture == "qwen3_next":
        common.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
    common.update(overrides)
    return config_classes[architecture](**common)


def tiny_causal_lm(architecture: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (float32, eval mode) with EOS and padding set for generation."""
    config = tiny_config(architecture, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=None
    )
    return model.eval()


def perturbed_head(model: PreTrainedModel, scale: float, seed: int = 0, **from_model_kwargs: Any) -> MTPHead:
    """A head initialised from `model` (`from_model_kwargs` go to
    [`MTPHead.from_model`][bebop_trl.MTPHead.from_model], e.g. `draft_vocab`), with Gaussian noise of standard
    deviation `scale` added to every parameter, so that its drafts are accepted often but not always (both the
    accept and the resample paths of rejection sampling run)."""
    head = MTPHead.from_model(model, **from_model_kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return head


def save_tiny_checkpoint(directory: str | os.PathLike, architecture: str = "llama", seed: int = 0) -> str:
    """Writes a tiny causal LM and the character tokenizer to `directory` (loadable with `from_pretrained`)."""
    model = tiny_causal_lm(architecture, seed)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return str(directory)


def save_native_mtp_checkpoint(directory: str | os.PathLike, seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes a tiny sharded Qwen3.5-style checkpoint that ships MTP weights under `mtp.*`, as released models do.

    The `mtp.*` tensors are built from the Qwen3.5 decoder layer itself (not from bebop-trl's head), so importing
    them tests the name mapping against the real layout.

    Returns:
        The `mtp.*` tensors written.
    """
    model = tiny_causal_lm("qwen3_5", seed)
    model.save_pretrained(directory, max_shard_size="100KB")
    char_tokenizer().save_pretrained(directory)
    config = model.config
    hidden = config.hidden_size
    torch.manual_seed(seed + 1)
    mtp_block = AutoModelForCausalLM.from_config(
        tiny_config("qwen3_5", num_hidden_layers=1, layer_types=["full_attention"])
    ).model
    native = {f"mtp.{k}": v for k, v in mtp_block.layers.state_dict().items()}
    native = {k.replace("mtp.", "mtp.layers.", 1): v for k, v in native.items()}
    native["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden) * 0.05
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        native[f"mtp.{name}.weight"] = torch.randn(hidden) * 0.1
    shard = "model-mtp.safetensors"
    save_tensors(native, os.path.join(directory, shard))
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    index = read_json(index_path)
    index["weight_map"].update(dict.fromkeys(native, shard))
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return native
