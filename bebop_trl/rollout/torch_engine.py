"""Rollouts with the pure-PyTorch [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator]."""

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..modeling import MTPHead
from ..speculative import GenerationOutput, RolloutDrafter, SpeculativeGenerator
from ..speculative.draft_length import AdaptiveDraftLength


def left_pad(
    sequences: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token id lists into `input_ids` and `attention_mask` tensors [B, max length]."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("Every prompt needs at least one token.")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_from_ids(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    head: MTPHead | None = None,
    num_speculative_tokens: int = 3,
    draft_sampling: str = "probabilistic",
    draft_length: AdaptiveDraftLength | None = None,
    rejection_sample_method: str = "standard",
    rollout_drafter: RolloutDrafter | None = None,
    **generate_kwargs: Any,
) -> GenerationOutput:
    """Runs the engine on prompts given as token id lists (left-padded on the policy's device); `draft_length`,
    `rejection_sample_method` and `rollout_drafter` are the engine's (see
    [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator]), `generate_kwargs` its `generate`'s."""
    input_ids, attention_mask = padded_prompts(policy, tokenizer, prompts)
    engine = SpeculativeGenerator(
        policy,
        head,
        num_speculative_tokens=num_speculative_tokens,
        draft_sampling=draft_sampling,
        draft_length=draft_length,
        rejection_sample_method=rejection_sample_method,
        rollout_drafter=rollout_drafter,
    )
    return engine.generate(input_ids, attention_mask, **generate_kwargs)


def padded_prompts(
    policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(input_ids, attention_mask)` of prompts given as token id lists, left-padded on the policy's device with the
    tokenizer's pad token (its EOS without one)."""
    device = policy.get_input_embeddings().weight.device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return left_pad(prompts, pad_token_id, device)


def sample_completions(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    **kwargs: Any,
) -> list[list[int]]:
    """Samples one completion per prompt and returns each as a list of token ids (its EOS included, no padding).

    Args:
        policy: The causal LM.
        tokenizer: Its tokenizer (for the pad token).
        prompts: Prompt token ids.
        **kwargs: `head`, `num_speculative_tokens`, `draft_sampling`, and the arguments of
            [`SpeculativeGenerator.generate`][bebop_trl.SpeculativeGenerator.generate].
    """
    out = generate_from_ids(policy, tokenizer, prompts, **kwargs)
    return out.unpadded(out.completion_ids)
