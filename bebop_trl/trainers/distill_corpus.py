"""Self-distilled corpora for head training at scale: the policy's completions and the hidden states the head reads.

A corpus is a folder of `datasets` shards (Arrow, memory-mapped), each written once it is complete, and a
`corpus.json` with the settings that made it. Each record holds the prompt and completion ids and the policy's final
hidden state at every position (bf16, stored as its 16-bit pattern), and optionally the hidden states entering a few
of its layers (what an EAGLE-3 head fuses) and the log-normaliser of the policy's logits at every position, so that
a head trains on it without running the policy again. A build that stops (interrupted, killed) resumes at the first
missing shard; the same settings give the same records, shard by shard.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from datasets import Array2D, Dataset, Features, Value, concatenate_datasets, load_from_disk
from datasets import Sequence as ListOf
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import MTPHead
from ..modeling.configuration_mtp_head import check_aux_layers
from ..modeling.teacher_forcing import policy_hidden_states
from ..ops.chunked import policy_log_normalizer
from ..rollout.torch_engine import generate_from_ids, padded_prompts
from .mtp_data import PROMPT_LENGTH, _weights_fingerprint


CORPUS_FILE = "corpus.json"
SHARDS_DIR = "shards"
HIDDEN_STATES = "hidden_states"
AUX_HIDDEN_STATES = "aux_hidden_states"
POLICY_LOG_NORMALIZER = "policy_log_normalizer"


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """What a corpus was sampled with; a resumed build must match it.

    Attributes:
        policy: The policy's name or path.
        weights: A fingerprint of its weights.
        prompts: A hash of the prompt list (after deduplication and exclusion).
        num_prompts: Distinct prompts sampled.
        samples_per_prompt: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature.
        top_p: Nucleus mass.
        top_k: Top-k cut-off.
        seed: Seed of the sampling (shard i samples with seed + i).
        shard_size: Records per shard.
        hidden_size: Width of the stored final hidden states.
        aux_layers: Layers whose input hidden states are stored too, concatenated in this order (layer 0: the
            embeddings; layer L: the output of decoder layer L - 1, before the final norm), or empty.
        log_normalizer: Whether records store the log-normaliser of the policy's logits at every position.
    """

    policy: str
    weights: str
    prompts: str
    num_prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    shard_size: int
    hidden_size: int
    aux_layers: tuple[int, ...] = ()
    log_normalizer: bool = False

    @property
    def num_records(self) -> int:
        return self.num_prompts * self.samples_per_prompt

    @property
    def num_shards(self) -> int:
        return -(-self.num_records // self.shard_size)


def build_distill_corpus(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Iterable[Sequence[int]],
    output_dir: str | os.PathLike,
    *,
    exclude_prompts: Iterable[Sequence[int]] = (),
    samples_per_prompt: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    shard_size: int = 1024,
    seed: int = 0,
    head: MTPHead | None = None,
    num_speculative_tokens: int = 3,
    aux_layers: Sequence[int] = (),
    log_normalizer: bool = False,
) -> Dataset:
    """Samples completions of `prompts` from the frozen policy and stores them with the policy's hidden states.

    Prompts are deduplicated, and every prompt of `exclude_prompts` (the evaluation sets) is removed, so that no
    evaluation prompt is ever trained on. Completions are sampled with the speculative engine (`head` only makes it
    faster: the completions follow the policy's law either way), then one forward pass of the policy over each
    batch of prompt + completion records the final hidden state of every position, the input teacher-forced head
    training reads (and, with `aux_layers`, the hidden states entering those layers, which an EAGLE-3 head fuses).

    Args:
        policy: The frozen policy.
        tokenizer: Its tokenizer (for padding).
        prompts: Prompt token id lists.
        output_dir: Folder of the corpus; an unfinished build there is resumed.
        exclude_prompts: Prompts never to sample (evaluation prompts).
        samples_per_prompt: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature of the completions (the rollout temperature of RL).
        top_p: Nucleus mass.
        top_k: Top-k cut-off.
        batch_size: Prompts generated together.
        shard_size: Records per shard (the unit of resumption).
        seed: Seed of the sampling.
        head: A draft head to sample faster with, or None.
        num_speculative_tokens: Drafts per cycle with `head`.
        aux_layers: Layers whose input hidden states to store as well ([`eagle3_aux_layers`][bebop_trl.modeling.eagle3_aux_layers] gives the layers vLLM's
            EAGLE-3 heads read); empty stores the final hidden states only.
        log_normalizer: Also store `policy_log_normalizer` [T], the log-sum-exp over the whole vocabulary of the
            policy's logits (temperature 1) at every position, computed from the stored bf16 hidden states. Heads
            with a draft vocabulary trained at temperature 1 then never sweep the policy's vocabulary in training;
            the build does the lm_head product once per position (about a quarter more arithmetic than the
            hidden-state pass of a 135M policy).

    Returns:
        The corpus, as [`load_distill_corpus`][bebop_trl.trainers.distill_corpus.load_distill_corpus] gives it.

    Raises:
        ValueError: If no prompt is left after exclusion, an aux layer is out of range, or `output_dir` holds a
            corpus built with other settings.
    """
    aux_layers = tuple(int(layer) for layer in aux_layers)
    check_aux_layers(aux_layers, policy.config.get_text_config().num_hidden_layers)
    excluded = {tuple(p) for p in exclude_prompts}
    distinct = [list(p) for p in dict.fromkeys(map(tuple, prompts)) if p not in excluded]
    if not distinct:
        raise ValueError("No prompt left to sample: every prompt is in exclude_prompts (or none was given).")
    settings = CorpusSettings(
        policy=policy.config.name_or_path,
        weights=_weights_fingerprint(policy),
        prompts=hashlib.sha256(json.dumps(distinct).encode()).hexdigest()[:16],
        num_prompts=len(distinct),
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        shard_size=shard_size,
        hidden_size=policy.config.get_text_config().hidden_size,
        aux_layers=aux_layers,
        log_normalizer=log_normalizer,
    )
    _claim_folder(output_dir, settings)
    repeated = [prompt for prompt in distinct for _ in range(samples_per_prompt)]
    done = _finished_shards(output_dir)
    progress = tqdm(total=len(repeated), initial=min(len(done) * shard_size, len(repeated)), desc="Corpus", unit="seq")
    for index in range(settings.num_shards):
        if index in done:
            continue
        shard_prompts = repeated[index * shard_size : (index + 1) * shard_size]
        generator = torch.Generator(device=policy.device).manual_seed(seed + index)
        records: dict[str, list] = {"input_ids": [], PROMPT_LENGTH: [], HIDDEN_STATES: []}
        if aux_layers:
            records[AUX_HIDDEN_STATES] = []
        if log_normalizer:
            records[POLICY_LOG_NORMALIZER] = []
        for start in range(0, len(shard_prompts), batch_size):
            batch = shard_prompts[start : start + batch_size]
            out = generate_from_ids(
                policy, tokenizer, batch, head=head, num_speculative_tokens=num_speculative_tokens,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
            )  # fmt: skip
            sequences = [p + c for p, c in zip(batch, out.unpadded(out.completion_ids), strict=True)]
            stored = _hidden_states(policy, tokenizer, sequences, aux_layers, log_normalizer)
            for row, (prompt, sequence) in enumerate(zip(batch, sequences, strict=True)):
                records["input_ids"].append(sequence)
                records[PROMPT_LENGTH].append(len(prompt))
                for name, rows in stored.items():
                    records[name].append(rows[row])
            progress.update(len(batch))
        _write_shard(output_dir, index, records, settings)
    progress.close()
    return load_distill_corpus(output_dir)


def load_distill_corpus(corpus_dir: str | os.PathLike) -> Dataset:
    """The records of a corpus written by [`build_distill_corpus`][bebop_trl.trainers.distill_corpus.build_distill_corpus],
    memory-mapped: `input_ids`, `prompt_length` and `hidden_states` ([T, H] int16 holding bf16 bit patterns; see
    [`hidden_states_of`][bebop_trl.trainers.distill_corpus.hidden_states_of]), and `aux_hidden_states` and
    `policy_log_normalizer` where the build stored them.

    Raises:
        ValueError: If the folder holds no corpus or an unfinished one (build it again with the same settings to
            finish it).
    """
    settings = corpus_settings(corpus_dir)
    done = _finished_shards(corpus_dir)
    missing = sorted(set(range(settings.num_shards)) - done)
    if missing:
        raise ValueError(
            f"The corpus in {corpus_dir} is unfinished: {len(missing)} of {settings.num_shards} shards are missing. "
            "Run build_distill_corpus again with the same settings to finish it."
        )
    return concatenate_datasets([load_from_disk(_shard_path(corpus_dir, i)) for i in range(settings.num_shards)])


def corpus_settings(corpus_dir: str | os.PathLike) -> CorpusSettings:
    """The settings a corpus was built with (its `corpus.json`)."""
    path = os.path.join(corpus_dir, CORPUS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{corpus_dir} holds no self-distilled corpus (no {CORPUS_FILE}).")
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    return CorpusSettings(**{**stored, "aux_layers": tuple(stored.get("aux_layers", ()))})


def hidden_states_of(stored: torch.Tensor) -> torch.Tensor:
    """The bf16 hidden states [..., T, H] of stored int16 bit patterns (as `with_format("torch")` returns them)."""
    return stored.to(torch.int16).view(torch.bfloat16)


@torch.no_grad()
def _hidden_states(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: list[list[int]],
    aux_layers: tuple[int, ...] = (),
    log_normalizer: bool = False,
) -> dict[str, list]:
    """Each sequence's stored columns, as numpy arrays: its final hidden states [T, H], its aux-layer hidden states
    [T, len(aux_layers) * H] (int16 bf16 bit patterns) and its policy log-normaliser [T] (float32), as asked."""
    input_ids, attention_mask = padded_prompts(policy, tokenizer, sequences)
    hidden, aux = policy_hidden_states(policy, input_ids, attention_mask, aux_layers)
    width = hidden.shape[1]

    def rows(values: torch.Tensor) -> list:
        values = values.cpu()
        return [values[row, width - len(sequence) :].numpy() for row, sequence in enumerate(sequences)]

    stored_hidden = hidden.to(torch.bfloat16)
    columns = {HIDDEN_STATES: rows(stored_hidden.view(torch.int16))}
    if aux is not None:
        columns[AUX_HIDDEN_STATES] = rows(aux.to(torch.bfloat16).view(torch.int16))
    if log_normalizer:
        # From the hidden states as stored, so that it normalises exactly the logits training computes from them.
        lm_head = policy.get_output_embeddings().weight
        columns[POLICY_LOG_NORMALIZER] = rows(policy_log_normalizer(stored_hidden, lm_head).float())
    return columns


def _claim_folder(output_dir: str | os.PathLike, settings: CorpusSettings) -> None:
    path = os.path.join(output_dir, CORPUS_FILE)
    if os.path.isfile(path):
        existing = corpus_settings(output_dir)
        if existing != settings:
            changed = {
                name: (getattr(existing, name), getattr(settings, name))
                for name in (f.name for f in dataclasses.fields(CorpusSettings))
                if getattr(existing, name) != getattr(settings, name)
            }
            raise ValueError(
                f"{output_dir} holds a corpus built with other settings (stored, requested): {changed}. Use another "
                "output_dir, or the stored settings to resume it."
            )
        return
    os.makedirs(os.path.join(output_dir, SHARDS_DIR), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(settings), f, indent=2)


def _shard_path(corpus_dir: str | os.PathLike, index: int) -> str:
    return os.path.join(corpus_dir, SHARDS_DIR, f"{index:05d}")


def _finished_shards(corpus_dir: str | os.PathLike) -> set[int]:
    folder = os.path.join(corpus_dir, SHARDS_DIR)
    if not os.path.isdir(folder):
        return set()
    return {int(name) for name in os.listdir(folder) if name.isdigit()}


def _write_shard(
    corpus_dir: str | os.PathLike, index: int, records: dict[str, list[Any]], settings: CorpusSettings
) -> None:
    columns = {
        "input_ids": ListOf(Value("int32")),
        PROMPT_LENGTH: Value("int32"),
        HIDDEN_STATES: Array2D(shape=(None, settings.hidden_size), dtype="int16"),
    }
    if settings.aux_layers:
        width = len(settings.aux_layers) * settings.hidden_size
        columns[AUX_HIDDEN_STATES] = Array2D(shape=(None, width), dtype="int16")
    if settings.log_normalizer:
        columns[POLICY_LOG_NORMALIZER] = ListOf(Value("float32"))
    features = Features(columns)
    staging = f"{_shard_path(corpus_dir, index)}.tmp-{os.getpid()}"
    Dataset.from_dict(records, features=features).save_to_disk(staging)
    os.replace(staging, _shard_path(corpus_dir, index))  # a shard appears whole or not at all


def is_distill_corpus(dataset: Dataset) -> bool:
    """Whether `dataset` holds a corpus's records (with the policy's hidden states)."""
    return HIDDEN_STATES in dataset.column_names


def prepare_corpus(dataset: Dataset, hidden_size: int) -> Dataset:
    """A corpus ready for head training: its hidden states checked against the policy's width and read as numpy
    arrays (the other columns stay lists). Records are cut at a maximum length by
    [`CorpusCollator`][bebop_trl.trainers.distill_corpus.CorpusCollator], so the corpus is never rewritten.

    Raises:
        ValueError: If the stored hidden states are not `hidden_size` wide (a corpus of another policy).
    """
    stored = len(dataset[0][HIDDEN_STATES][0])
    if stored != hidden_size:
        raise ValueError(
            f"The corpus stores hidden states of width {stored}, but the policy's hidden size is {hidden_size}: it was "
            "built with another policy. Build a corpus with this policy (build_distill_corpus)."
        )
    arrays = [name for name in STORED_ARRAYS if name in dataset.column_names]
    return dataset.with_format("numpy", columns=arrays, output_all_columns=True)


# The per-position arrays a record may store, as the collator returns them: hidden states in bf16, the rest float32.
STORED_ARRAYS = (HIDDEN_STATES, AUX_HIDDEN_STATES, POLICY_LOG_NORMALIZER)


class CorpusCollator:
    """Pads corpus records into a batch: `input_ids` and `attention_mask` (right padding), `prompt_length`, and the
    policy's hidden states `hidden_states` [B, T, H] in bf16 (zeros at padding), with `aux_hidden_states`
    [B, T, A * H] (bf16) and `policy_log_normalizer` [B, T] (float32) where the corpus stores them.

    Args:
        pad_token_id: Token id of the padding.
        max_length: Records are cut to this many tokens (None: not cut).
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        limit = self.max_length
        lengths = [len(f["input_ids"]) if limit is None else min(len(f["input_ids"]), limit) for f in features]
        width = max(lengths)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        arrays = [name for name in STORED_ARRAYS if name in features[0]]
        states = {
            name: torch.zeros((len(features), width, *features[0][name].shape[1:]), dtype=_collated_dtype(name))
            for name in arrays
        }
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"][:length])
            attention_mask[row, :length] = 1
            for name in arrays:
                with warnings.catch_warnings():
                    # Arrow's arrays are read-only; the view is only read, copied into the batch at once.
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    values = torch.from_numpy(feature[name][:length])
                states[name][row, :length] = values if name == POLICY_LOG_NORMALIZER else hidden_states_of(values)
        prompt_length = torch.tensor(
            [min(int(f.get(PROMPT_LENGTH, 0)), length) for f, length in zip(features, lengths, strict=True)],
            dtype=torch.long,
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            PROMPT_LENGTH: prompt_length,
            **states,
        }


def _collated_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == POLICY_LOG_NORMALIZER else torch.bfloat16
