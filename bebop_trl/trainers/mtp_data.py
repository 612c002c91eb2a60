"""Datasets for head training: tokenisation of the supported formats and self-distillation of prompt-only data."""

import hashlib
import json
import os
from collections.abc import Callable

import torch
from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..embedded import default_cache_dir
from ..rollout import sample_completions


PROMPT_LENGTH = "prompt_length"
SUPPORTED_FORMATS = (
    "'input_ids' (pre-tokenised)",
    "'text' (plain text; see dataset_text_field)",
    "'messages' (a conversation; one that ends in a user turn is a prompt for self-distillation)",
    "'prompt' with 'completion' (prompt-completion pairs)",
    "'prompt' alone (prompts for self-distillation)",
)


def is_conversational(value) -> bool:
    """Whether `value` is a conversation: a non-empty list of messages with a `role`."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def detect_format(dataset: Dataset, text_field: str = "text") -> str:
    """Returns the dataset's format: `input_ids`, `text`, `messages`, `prompt_completion` or `prompt`.

    Raises:
        ValueError: If none of the supported columns is present, naming the columns found and those expected.
    """
    columns = set(dataset.column_names)
    if "input_ids" in columns:
        return "input_ids"
    if text_field in columns:
        return "text"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns:
        return "prompt_completion" if "completion" in columns else "prompt"
    raise ValueError(
        f"The dataset has columns {sorted(columns)}, none of which MTPTrainer can train on. Expected one of: "
        + "; ".join(SUPPORTED_FORMATS)
        + "."
    )


def needs_self_distillation(dataset: Dataset, text_field: str = "text") -> bool:
    """Whether the dataset holds only prompts, whose completions must be sampled from the policy."""
    data_format = detect_format(dataset, text_field)
    if data_format == "prompt":
        return True
    return data_format == "messages" and dataset[0]["messages"][-1]["role"] == "user"


def tokenize_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, text_field: str = "text", max_length: int | None = None
) -> Dataset:
    """Tokenises a dataset with full sequences into `input_ids` and `prompt_length` (0 where unknown).

    `prompt_length` marks where the prompt ends, so evaluation can draft from held-out prompts.
    """
    data_format = detect_format(dataset, text_field)

    def encode(example: dict) -> dict:
        prompt_ids: list[int] = []
        if data_format == "input_ids":
            ids = list(example["input_ids"])
            prompt_length = example.get(PROMPT_LENGTH, 0)
        elif data_format == "text":
            ids = tokenizer(example[text_field], add_special_tokens=True)["input_ids"]
            prompt_length = 0
        elif data_format == "messages":
            messages = example["messages"]
            ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
            prompt_ids = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True) if len(messages) > 1 else []
            prompt_length = len(prompt_ids)
        else:  # prompt + completion
            prompt, completion = example["prompt"], example["completion"]
            if is_conversational(prompt):
                prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
                ids = _chat_ids(tokenizer, prompt + completion, add_generation_prompt=False)
            else:
                prompt_ids = tokenizer(prompt)["input_ids"]
                ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
            prompt_length = len(prompt_ids)
        if max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids, PROMPT_LENGTH: min(prompt_length, len(ids))}

    tokenized = dataset.map(encode, remove_columns=dataset.column_names, desc="Tokenising")
    return tokenized.filter(lambda example: len(example["input_ids"]) >= 2, desc="Dropping sequences under 2 tokens")


def prompt_ids_of(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> list[list[int]]:
    """The token ids of the prompts of a prompt-only dataset (chat template applied to conversations)."""
    column = "messages" if detect_format(dataset, text_field) == "messages" else "prompt"
    prompts = []
    for value in dataset[column]:
        if is_conversational(value):
            prompts.append(_chat_ids(tokenizer, value, add_generation_prompt=True))
        else:
            prompts.append(tokenizer(value)["input_ids"])
    return prompts


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def self_distill(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Samples completions of `prompts` from the frozen policy and returns prompt + completion sequences.

    The result is cached on disk as a `datasets.Dataset`, keyed by the policy, the prompts and the sampling
    settings, so that a rerun reuses it instead of sampling again.

    Returns:
        A dataset with `input_ids` (prompt followed by completion) and `prompt_length`.
    """
    settings = dict(
        policy=policy.config.name_or_path,
        weights=_weights_fingerprint(policy),
        prompts=hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or os.path.join(default_cache_dir(), "self_distillation"), key)
    if os.path.isdir(path):
        log(f"Reusing self-distilled data from {path}")
        return load_from_disk(path)

    generator = torch.Generator(device=policy.device).manual_seed(seed)
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    rows: dict[str, list] = {"input_ids": [], PROMPT_LENGTH: []}
    for start in tqdm(range(0, len(repeated), batch_size), desc="Self-distillation", unit="batch"):
        batch = repeated[start : start + batch_size]
        completions = sample_completions(
            policy,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
        )
        for prompt, completion in zip(batch, completions, strict=True):
            rows["input_ids"].append(prompt + completion)
            rows[PROMPT_LENGTH].append(len(prompt))
    dataset = Dataset.from_dict(rows)
    staging = f"{path}.tmp-{os.getpid()}"
    dataset.save_to_disk(staging)
    os.replace(staging, path)
    log(f"Saved {len(dataset)} self-distilled sequences to {path}")
    return load_from_disk(path)


def _weights_fingerprint(policy: PreTrainedModel) -> str:
    """A cheap fingerprint of the policy's weights (a fine-tune under the same name gets other samples)."""
    digest = hashlib.sha256()
    params = list(policy.parameters())
    for param in params[:: max(1, len(params) // 8)]:
        digest.update(param.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
