"""Configuration of [`MTPTrainer`][bebop_trl.MTPTrainer]."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..modeling.configuration_mtp_head import EAGLE3_LAYOUT
from ..ops import LOSS_TYPES


@dataclass
class MTPConfig(TrainingArguments):
    """Configuration of [`MTPTrainer`][bebop_trl.MTPTrainer]: pre-RL training of an MTP head on a frozen policy.

    Only the fields specific to head training are listed here; every `transformers.TrainingArguments` field applies
    too. Some defaults differ from `TrainingArguments` (learning rate, logging interval, checkpoint format). With
    [`TrlParser`](https://huggingface.co/docs/trl/main/en/script_utils) every field is a command-line flag.
    """

    # Head
    mtp_head: str | None = field(
        default=None,
        metadata={
            "help": "Head to start from: a folder or Hub id of a saved head, 'native' to import the MTP weights the "
            "policy checkpoint ships (Qwen3.5, Qwen3-Next), or None for a new head built from the policy."
        },
    )
    head_layout: str | None = field(
        default=None,
        metadata={
            "help": "Layout of a new head: 'mtp', 'eagle' (EAGLE-1: reads the policy's final hidden state) or "
            "'eagle3' (EAGLE-3: fuses the hidden states entering a low, a middle and a high layer of the policy; "
            "vLLM method 'eagle3'). None picks the layout vLLM loads as is for the policy ('mtp' for native-MTP "
            "model types, 'eagle' otherwise)."
        },
    )
    head_aux_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "For head_layout='eagle3': the policy layers whose input hidden states the head fuses (layer 0's "
            "input is the embeddings). None: vLLM's default, layers 2, L // 2 and L - 3 of an L-layer policy. A "
            "corpus the head trains on must store the same layers (build_distill_corpus(aux_layers=...))."
        },
    )
    head_num_layers: int = field(default=1, metadata={"help": "Number of decoder layers of a new head."})
    draft_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Build the new head with a draft vocabulary of this many tokens: those that carry the most of "
            "the policy's mass on the training data (its completions where it has prompts), the tokenizer's special "
            "tokens always among them. The head's lm_head product shrinks to draft_vocab_size / V of the policy's. "
            "Rejection sampling stays exact; the policy's mass outside the draft vocabulary is never accepted, and "
            "is logged as target_mass_outside_draft_vocab. None: the whole vocabulary. vLLM runs such a head in the "
            "eagle layout (through this package's plugin), not in the mtp layout."
        },
    )

    # Loss
    loss_type: str = field(
        default="e2e_tv",
        metadata={
            "help": "Head loss: 'e2e_tv' (one minus the expected accepted length over the unrolled steps), 'tv' "
            "(total variation = one minus acceptance), 'kl' (KL(p||q)), 'rkl' (KL(q||p)), 'ce' (cross-entropy "
            "on the data's tokens), the LK losses 'lk_alpha' (-log of each step's acceptance) and 'lk_lambda' (a "
            "KL/TV blend whose KL weight decays as acceptance rises), or their chain forms 'e2e_lk_alpha' and "
            "'e2e_lk_lambda' over the unrolled steps (see bebop_trl.ops.mtp_loss).",
            "choices": list(LOSS_TYPES),
        },
    )
    num_mtp_steps: int = field(
        default=5, metadata={"help": "Draft steps unrolled in training (teacher forcing along the sequence)."}
    )
    kl_warm_start: float = field(
        default=0.2,
        metadata={
            "help": "For 'tv' and 'e2e_tv': train the first steps with 'kl' instead, whose gradient does not vanish "
            "where the head and the policy barely overlap (the TV gradient does). A value >= 1 is a number of "
            "optimizer steps, one in [0, 1) a fraction of the run's steps. Trained from scratch on SmolLM2-135M for "
            "300 steps, e2e_tv after a 0.2 warm start ends 4.1 points of step-1 acceptance above ce (docs: "
            "Benchmarks, loss study in the paper's protocol)."
        },
    )
    lk_kl_scale: float = field(
        default=1.0,
        metadata={
            "help": "For 'lk_lambda' and 'e2e_lk_lambda': the KL weight at zero acceptance, in [0, 1]. The weight "
            "is lk_kl_scale * exp(-lk_kl_decay * acceptance)."
        },
    )
    lk_kl_decay: float = field(
        default=1.0,
        metadata={"help": "For 'lk_lambda' and 'e2e_lk_lambda': how fast the KL weight decays as acceptance rises."},
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Score only the slots the engine drafts in a rollout (starts whose next token is a completion "
            "token) in data with prompts: self-distilled, prompt/completion or conversational. Rows without a "
            "prompt are scored everywhere."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the RL rollouts the head is trained for: both the policy's and the "
            "head's distributions are taken at this temperature, and self-distillation samples at it."
        },
    )
    token_tile: int | None = field(
        default=None, metadata={"help": "Token tile of the chunked loss (None: the op's default)."}
    )
    vocab_tile: int | None = field(
        default=None, metadata={"help": "Vocabulary tile of the chunked loss (None: the op's default)."}
    )

    # Data
    max_length: int | None = field(
        default=1024, metadata={"help": "Truncate tokenised sequences to this many tokens (None: no truncation)."}
    )
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding plain text."})

    # Self-distillation
    distill_samples_per_prompt: int = field(
        default=1, metadata={"help": "Completions sampled from the frozen policy per prompt of a prompt-only dataset."}
    )
    distill_max_new_tokens: int = field(
        default=256, metadata={"help": "Maximum length of a self-distilled completion."}
    )
    distill_top_p: float = field(default=1.0, metadata={"help": "Top-p of self-distillation sampling."})
    distill_top_k: int = field(default=0, metadata={"help": "Top-k of self-distillation sampling (0: off)."})
    distill_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch in self-distillation."})
    distill_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where self-distilled datasets are cached (keyed by policy, prompts and sampling settings), so a "
            "rerun reuses them. None: `$BEBOP_TRL_CACHE/self_distillation` (default `~/.cache/bebop_trl`)."
        },
    )

    # Evaluation with the real engine
    num_speculative_tokens: int = field(
        default=3, metadata={"help": "Draft length k of the measured acceptance in evaluation."}
    )
    eval_num_prompts: int = field(
        default=16, metadata={"help": "Held-out prompts on which evaluation measures the engine's acceptance."}
    )
    eval_max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens generated per prompt when measuring acceptance."}
    )

    # TrainingArguments defaults that differ for head training
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "Initial learning rate of AdamW for the head. Adam moves every weight of the 2H -> H projection "
            "by about the learning rate per step whatever the gradient's scale, so an eagle head (no norm after "
            "it) diverges on SmolLM2-135M at 1e-3 and trains steadily at 1e-4."
        },
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (a float in (0, 1) is a ratio of total steps)."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "The scheduler type to use."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Linear warmup: steps, or a ratio of total steps."})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}: use one of {LOSS_TYPES}.")
        if self.num_mtp_steps < 1 or self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_mtp_steps ({self.num_mtp_steps}) and num_speculative_tokens ({self.num_speculative_tokens}) "
                "must be >= 1."
            )
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be None or >= 1, got {self.draft_vocab_size}.")
        if self.head_aux_layers is not None and self.head_layout != EAGLE3_LAYOUT:
            raise ValueError(f"head_aux_layers is for head_layout='eagle3', got head_layout={self.head_layout!r}.")
        if not 0 <= self.lk_kl_scale <= 1 or self.lk_kl_decay < 0:
            raise ValueError(
                f"lk_kl_scale must lie in [0, 1] and lk_kl_decay be >= 0, got {self.lk_kl_scale} and "
                f"{self.lk_kl_decay}."
            )
        if self.kl_warm_start < 0:
            raise ValueError(f"kl_warm_start must be >= 0, got {self.kl_warm_start}.")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (the head is trained on sampled rollouts), got {self.temperature}."
            )
        super().__post_init__()
