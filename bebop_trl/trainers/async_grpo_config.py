"""Configuration of [`BebopAsyncGRPOTrainer`][bebop_trl.trainers.async_grpo_trainer.BebopAsyncGRPOTrainer]."""

from dataclasses import dataclass, field

from trl.experimental.async_grpo import AsyncGRPOConfig

from ..ops import LOSS_TYPES
from ..speculative import DRAFT_SAMPLING_MODES
from .grpo_config import full_precision_without_gpu


WEIGHT_TRANSFERS = ("nccl", "file")


@dataclass
class BebopAsyncGRPOConfig(AsyncGRPOConfig):
    """Configuration of [`BebopAsyncGRPOTrainer`][bebop_trl.trainers.async_grpo_trainer.BebopAsyncGRPOTrainer]:
    TRL's `AsyncGRPOConfig` plus the draft head of the vLLM server and the way weights reach it.

    The server drafts with its own copy of the head (`bebop-trl vllm-serve --mtp_head ...`); the trainer checks at
    start-up that it drafts `num_speculative_tokens` tokens per cycle in the `draft_sampling` mode. Only the fields
    added to `AsyncGRPOConfig` are listed here; every other field applies unchanged.
    """

    num_speculative_tokens: int = field(
        default=3, metadata={"help": "Tokens the server's head drafts per cycle (k); checked against the server."}
    )
    draft_sampling: str = field(
        default="probabilistic",
        metadata={
            "help": "Drafting mode the server must use, checked at start-up: 'probabilistic' (drafts sampled from "
            "the head, accepted with min(1, p/q); keeps acceptance up as the policy's entropy rises) or 'greedy'.",
            "choices": list(DRAFT_SAMPLING_MODES),
        },
    )
    weight_transfer: str = field(
        default="nccl",
        metadata={
            "help": "How policy weights reach the server: 'nccl' (TRL's broadcast; GPUs on both sides) or 'file' "
            "(safetensors written to weight_sync_dir and loaded in place by the server; for CPU or a single node). "
            "The server must be started with the same `bebop-trl vllm-serve --weight_transfer`.",
            "choices": list(WEIGHT_TRANSFERS),
        },
    )
    weight_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "weight_transfer='file': folder the trainer writes and the server reads (the same path on both "
            "sides). Defaults to `output_dir/weight_sync`."
        },
    )

    # Online head updates
    mtp_head: str | None = field(
        default=None,
        metadata={
            "help": "With mtp_online_loss: the head the server drafts with (the same folder or Hub id as "
            "`bebop-trl vllm-serve --mtp_head`), which the trainer updates and sends to the server."
        },
    )
    mtp_online_loss: str | None = field(
        default=None,
        metadata={
            "help": "Train the head on each training batch's rollouts with this loss (a loss type of "
            "bebop_trl.ops.mtp_loss) and send it to the server's drafter with the next weight sync; None keeps the "
            "server's head fixed. Needs mtp_head; works with either weight_transfer.",
            "choices": [None, *LOSS_TYPES],
        },
    )
    mtp_online_learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate of the online head updates."}
    )
    mtp_online_max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient-norm clip of the online head updates."}
    )

    def __post_init__(self):
        full_precision_without_gpu(self)
        super().__post_init__()
        if self.weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"weight_transfer must be one of {WEIGHT_TRANSFERS}, got {self.weight_transfer!r}.")
        if self.draft_sampling not in DRAFT_SAMPLING_MODES:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING_MODES}, got {self.draft_sampling!r}.")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}.")
        if self.mtp_online_loss is not None:
            if self.mtp_online_loss not in LOSS_TYPES:
                raise ValueError(f"mtp_online_loss must be one of {LOSS_TYPES} or None, got {self.mtp_online_loss!r}.")
            if self.mtp_head is None:
                raise ValueError("mtp_online_loss trains the server's head: set mtp_head to the same head.")
