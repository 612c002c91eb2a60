"""`BebopAsyncGRPOTrainer`: TRL's asynchronous GRPO trainer with rollouts drafted by an MTP head on the vLLM server."""

import contextlib
import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import requests
import torch
from transformers import AttentionInterface, TrainerCallback
from trl.experimental.async_grpo import AsyncGRPOTrainer
from trl.experimental.async_grpo import async_grpo_trainer as trl_async_grpo
from trl.experimental.async_grpo.packing import TREE_ATTENTION
from trl.experimental.async_grpo.weight_transfer import WeightTransferClient

from .._compat import attention_implementation, trl_supports_response_template
from ..modeling import MTPHead
from ..modeling.vllm_export import vllm_draft_weights
from ..rollout.file_weight_transfer import FileWeightTransfer
from ..rollout.nccl_draft_transfer import NCCLDraftWeightTransfer
from ..rollout.vllm_backend import read_server_counters
from ..speculative import AcceptanceCounts
from ..speculative.engine import eval_mode
from ..speculative.exactness import completion_logprobs
from .acceptance_fit import AcceptanceEntropyFit
from .async_grpo_config import BebopAsyncGRPOConfig
from .grpo_trainer import FIT_NAME, HEAD_DIR
from .head_loss import as_master_head, average_head_gradients, load_head, log_online_head_step, online_head_step
from .tree_attention import sdpa_tree_attention


# The largest gap between the server's sampling log-probs and the policy's that start-up accepts: well above the
# rounding of a bf16 server, well below the error of a server that samples another law.
SERVED_LOGPROB_TOLERANCE = 0.5


class BebopAsyncGRPOTrainer(AsyncGRPOTrainer):
    """TRL's `AsyncGRPOTrainer` whose vLLM server drafts with an MTP head, and which logs the server's acceptance.

    Everything of TRL's asynchronous design stays: the vLLM server started apart from the trainer, the rollout worker
    process, bounded staleness (`max_staleness`) and the weight sync every `weight_sync_steps` steps. What it adds:

    - the server is `bebop-trl vllm-serve --mtp_head ...`, which drafts with the head (probabilistically by default)
      behind the same exactness guard as every other rollout path; the trainer checks at start-up that the server
      drafts as `args` says;
    - `args.weight_transfer="file"` pushes the policy through safetensors files instead of NCCL
      ([`FileWeightTransfer`][bebop_trl.rollout.file_weight_transfer.FileWeightTransfer]), which needs no GPU;
    - `args.mtp_online_loss` trains the head on the rollouts and sends it to the server's drafter with the next weight
      sync, over TRL's NCCL group or through files;
    - every log reads the server's spec-decode counters from `/metrics`: acceptance per position, accepted drafts per
      cycle, and one point (the window's mean policy entropy, its acceptance) of the acceptance-entropy fit, saved as
      `acceptance_entropy_fit.json` and `.png` in `output_dir` at the end of training;
    - without CUDA, the policy trains with a PyTorch version of TRL's FlashAttention-3 tree attention.

    The server's counters are server-wide: run one trainer per server for the acceptance figures to be its own.

    Args:
        model: Path or Hub id of the policy (the server serves the same model).
        reward_funcs: As in TRL's `AsyncGRPOTrainer`.
        args: The configuration.
        train_dataset: Prompts, as in TRL.
        processing_class: The tokenizer.
        callbacks: As in TRL.
        optimizers: As in TRL.
        peft_config: As in TRL.
        tools: As in TRL.
        environment_factory: As in TRL.
        rollout_worker: TRL's rollout worker by default.
        weight_transfer: By default TRL's NCCL transfer, or a `FileWeightTransfer` with `weight_transfer="file"`.
    """

    _tag_names = ("trl", "async-grpo", "bebop-trl", "speculative-decoding")

    def __init__(
        self,
        model: str,
        reward_funcs: Any = None,
        args: BebopAsyncGRPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        tools: list | None = None,
        environment_factory: Any = None,
        rollout_worker: Any = None,
        weight_transfer: Any = None,
    ):
        if args is None:
            args = BebopAsyncGRPOConfig(f"{model.split('/')[-1]}-BebopAsyncGRPO")
        if not isinstance(args, BebopAsyncGRPOConfig):
            raise TypeError(f"args must be a BebopAsyncGRPOConfig, got {type(args).__name__}.")
        if weight_transfer is None and args.weight_transfer == "file":
            sync_dir = args.weight_sync_dir or os.path.join(args.output_dir, "weight_sync")
            weight_transfer = FileWeightTransfer(
                args.vllm_server_base_url,
                sync_dir,
                timeout=args.vllm_server_timeout,
                draft_weights=lambda: vllm_draft_weights(self.mtp_head),
            )
        if processing_class is not None:
            processing_class = with_response_parser(processing_class)
        with _without_cuda_peak_flops():
            super().__init__(
                model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
                tools=tools,
                environment_factory=environment_factory,
                rollout_worker=rollout_worker,
                weight_transfer=weight_transfer,
            )
        if self.accelerator.device.type != "cuda":
            # TRL registers its FlashAttention-3 version in __init__ and looks it up at every forward.
            AttentionInterface.register(TREE_ATTENTION, sdpa_tree_attention)
        self.mtp_head = self._load_head() if args.mtp_online_loss else None
        if self.mtp_head is not None and self.accelerator.is_main_process:
            self.weight_transfer = self._with_head_transfer(self.weight_transfer)
        self._head_optimizer = (
            torch.optim.AdamW(self.mtp_head.parameters(), lr=args.mtp_online_learning_rate)
            if self.mtp_head is not None
            else None
        )
        self._fit = AcceptanceEntropyFit(seed=args.seed)
        # After TRL's train-begin callback, which loads the policy into the server.
        self.add_callback(_CheckServedLogprobs(self))
        # The server's counters at the last log (main process; read first when training starts).
        self._server_counts: AcceptanceCounts | None = None

    def _with_head_transfer(self, transfer: Any) -> Any:
        """The main process's weight transfer, able to send the head after an online update."""
        if isinstance(transfer, WeightTransferClient):
            # TRL's NCCL client for the policy: the head rides on its group.
            return NCCLDraftWeightTransfer(transfer, draft_weights=lambda: vllm_draft_weights(self.mtp_head))
        if not callable(getattr(transfer, "head_updated", None)):
            raise TypeError(
                f"mtp_online_loss updates the server's head, but the weight transfer {type(transfer).__name__} cannot "
                "send it (it has no `head_updated()`; TRL's LoRA sync has none either). Use weight_transfer='nccl' "
                "or 'file' with a full policy, or set mtp_online_loss=None."
            )
        return transfer

    def _load_head(self) -> MTPHead:
        """The head the server drafts with, bound to the policy, in float32 (the master weights of the updates)."""
        policy = self.accelerator.unwrap_model(self.model)
        return as_master_head(load_head(policy, self.args.mtp_head), policy)

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.mtp_head is not None:
            self._update_head_online(inputs)
        return loss

    def _update_head_online(self, inputs: dict[str, torch.Tensor]) -> None:
        """One optimizer step of the head on this micro-batch's rollouts, sent to the server with the next sync."""
        args, head = self.args, self.mtp_head
        input_ids, attention_mask, is_completion = unpack_tree_row(inputs)
        policy = self.accelerator.unwrap_model(self.model)
        # The policy runs TRL's packed attention, which needs the packing's arguments: padded rows use SDPA.
        with attention_implementation(policy, "sdpa"):
            result, grad_norm = online_head_step(
                head,
                self._head_optimizer,
                policy,
                input_ids.to(policy.device),
                attention_mask.to(policy.device),
                is_completion.to(policy.device),
                num_steps=args.num_speculative_tokens,
                loss_type=args.mtp_online_loss,
                temperature=args.temperature,
                max_grad_norm=args.mtp_online_max_grad_norm,
                average_gradients=functools.partial(average_head_gradients, self.accelerator, head),
            )
        log_online_head_step(self._metrics["train"], self.accelerator, result, grad_norm)
        if self.weight_transfer is not None:
            self.weight_transfer.head_updated()

    def _check_server(self) -> AcceptanceCounts:
        """Waits for the server, checks that it drafts as `args` says and returns its counters so far."""
        args = self.args
        self.vllm_client.wait_for_server_ready()
        speculative = self.vllm_client.get_server_info().get("speculative_config")
        check_server_drafts(speculative, args.num_speculative_tokens, args.draft_sampling, args.vllm_server_base_url)
        return read_server_counters(args.vllm_server_base_url, timeout=args.request_timeout)

    def _check_served_logprobs(self) -> None:
        """Samples one completion from the server and compares its sampling log-probs with the policy's.

        A server that samples from another law than the policy's (a vLLM build with a known defect started without
        the package's fixes, or other weights than the trainer's) fails here rather than training on wrong
        importance weights. Runs on a single process, where the policy's forward needs no other process.
        """
        if self.accelerator.num_processes != 1 or self.train_dataset is None:
            return
        url = self.args.vllm_server_base_url.rstrip("/")
        prompt = self.train_dataset[0]["prompt"]
        tokenizer = self.processing_class
        prompt_ids = (
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
            if isinstance(prompt, list)
            else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        served = sample_with_logprobs(
            url, prompt_ids, temperature=self.args.temperature, timeout=self.args.request_timeout
        )
        policy = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), eval_mode(policy), attention_implementation(policy, "sdpa"):
            expected = completion_logprobs(policy, [prompt_ids], [served[0]], temperature=self.args.temperature)[0]
        gap = max(abs(a - b) for a, b in zip(served[1], expected, strict=True))
        if gap > SERVED_LOGPROB_TOLERANCE:
            raise RuntimeError(
                f"The vLLM server at {url} returns sampling log-probs up to {gap:.3f} away from the policy's: it does "
                "not sample from the policy's law. Start it with `bebop-trl vllm-serve` (its exactness guard applies "
                "the fixes of the installed vLLM build), from the same weights and dtype as the trainer."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the server's acceptance since the last log, then logs as TRL does."""
        if self._server_counts is not None and self.model.training:
            counters = read_server_counters(self.args.vllm_server_base_url, timeout=self.args.request_timeout)
            window, self._server_counts = counters - self._server_counts, counters
            metrics = self._metrics["train"]
            if window.num_drafts:
                for name, value in window.metrics("rollout/").items():
                    metrics[name].append(value)
                self._add_fit_point(metrics.get("entropy", []), window)
        super().log(logs, start_time)

    def _add_fit_point(self, entropies: list, window: AcceptanceCounts) -> None:
        """One point of the acceptance-entropy fit per log window: the policy's mean entropy on the window's training
        tokens against the server's acceptance over the window, weighted by its drafted tokens."""
        entropies = [value for value in entropies if not isinstance(value, tuple)]
        if not entropies:
            return
        self._fit.update(
            torch.tensor([sum(entropies) / len(entropies)], dtype=torch.float64),
            torch.tensor([window.acceptance_rate], dtype=torch.float64),
            torch.tensor([float(window.num_draft_tokens)], dtype=torch.float64),
            step=self.state.global_step,
        )
        for name, value in self._fit.metrics().items():
            self._metrics["train"][name].append(value)

    def train(self, *args: Any, **kwargs: Any):
        """Checks the server's drafting, runs TRL's training, then writes the acceptance-entropy fit (JSON and PNG)
        to `output_dir`."""
        if self.accelerator.is_main_process and self.vllm_client is not None:
            self._server_counts = self._check_server()
        result = super().train(*args, **kwargs)
        if self.args.should_save and self.mtp_head is not None:
            self.mtp_head.save_pretrained(os.path.join(self.args.output_dir, HEAD_DIR))
        if self.args.should_save and self._server_counts is not None:
            self._fit.save(self.args.output_dir, FIT_NAME, title=self.args.run_name)
        return result


def with_response_parser(tokenizer: Any) -> Any:
    """The tokenizer with a response parser, which TRL's rollout worker needs to read completions as messages.

    TRL adds one for the chat templates it knows. A ChatML template it does not know (SmolLM2's, among others)
    marks turns as Qwen3's does, so it gets TRL's Qwen3 parser; any other template is left to TRL, which names the fix.
    """
    from trl.chat_template_utils import add_response_schema, qwen3_schema, qwen3_template

    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return tokenizer
    try:
        return add_response_schema(tokenizer)
    except ValueError:
        if "<|im_start|>" not in (getattr(tokenizer, "chat_template", None) or ""):
            raise
    if trl_supports_response_template():
        tokenizer.response_template = qwen3_template
    else:
        tokenizer.response_schema = qwen3_schema
    return tokenizer


def sample_with_logprobs(
    url: str,
    prompt_ids: list[int],
    *,
    temperature: float,
    max_tokens: int = 16,
    seed: int = 0,
    timeout: float = 600.0,
) -> tuple[list[int], list[float]]:
    """One completion of `prompt_ids` from the server at `url`, EOS ignored, and its sampling log-probs."""
    model = requests.get(f"{url}/v1/models", timeout=timeout).json()["data"][0]["id"]
    body = {
        "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature, "logprobs": 0,
        "return_token_ids": True, "ignore_eos": True, "seed": seed,
    }  # fmt: skip
    response = requests.post(f"{url}/v1/completions", json=body, timeout=timeout)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


class _CheckServedLogprobs(TrainerCallback):
    def __init__(self, trainer: BebopAsyncGRPOTrainer):
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer.accelerator.is_main_process:
            self._trainer._check_served_logprobs()


def check_server_drafts(speculative: dict | None, num_speculative_tokens: int, draft_sampling: str, url: str) -> None:
    """Raises if the server's speculative config (from its `/server_info`) does not draft as the trainer expects."""
    if not speculative:
        raise ValueError(
            f"The vLLM server at {url} does not draft: start it with `bebop-trl vllm-serve --mtp_head <head>`."
        )
    served = (speculative.get("num_speculative_tokens"), speculative.get("draft_sample_method"))
    if served != (num_speculative_tokens, draft_sampling):
        raise ValueError(
            f"The vLLM server at {url} drafts {served[0]} tokens per cycle in {served[1]!r} mode, but the trainer is "
            f"configured for {num_speculative_tokens} in {draft_sampling!r} mode. Start the server with "
            f"`--num_speculative_tokens {num_speculative_tokens} --draft_sampling {draft_sampling}` or set "
            "num_speculative_tokens and draft_sampling to match it."
        )


def unpack_tree_row(inputs: dict[str, torch.Tensor]) -> tuple[torch.LongTensor, torch.Tensor, torch.BoolTensor]:
    """The sequences of one tree-packed training row of TRL's async trainer, padded on the right.

    TRL's packing forwards a prefix shared by several samples once; its segments are laid out in depth-first order, so
    a segment whose successor does not extend its path ends a sample, and that path is the sample's tokens. A token
    is a completion token when its predecessor's position carries a label.

    Args:
        inputs: This process's batch from TRL's `DataCollatorForRollout` (one row).

    Returns:
        input_ids [B, T], attention_mask [B, T] and is_completion [B, T] of the row's distinct samples.
    """
    real = inputs["attention_mask"][0].bool()
    ids, labels = inputs["input_ids"][0][real], inputs["shift_labels"][0][real]
    kv_index = inputs["tree_kv_index"][0]
    kv_index = kv_index[kv_index >= 0]
    starts = inputs["tree_cu_seqlens_k"][0]
    starts = starts[starts >= 0].tolist()
    paths = [kv_index[a:b] for a, b in itertools.pairwise(starts)]

    def extends(path: torch.Tensor, parent: torch.Tensor) -> bool:
        return len(path) > len(parent) and torch.equal(path[: len(parent)], parent)

    samples = [
        path
        for path, after in zip(paths, [*paths[1:], None], strict=True)
        if after is None or not extends(after, path)
    ]
    length = max(len(path) for path in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    is_completion = torch.zeros(len(samples), length, dtype=torch.bool)
    for row, path in enumerate(samples):
        input_ids[row, : len(path)] = ids[path]
        attention_mask[row, : len(path)] = 1
        is_completion[row, 1 : len(path)] = labels[path[:-1]] != -100
    return input_ids, attention_mask, is_completion


@contextlib.contextmanager
def _without_cuda_peak_flops() -> Iterator[None]:
    """TRL looks up the device's peak FLOPs (for its MFU metric) with `torch.cuda` calls that fail without CUDA;
    without CUDA there is no peak to report."""
    if torch.cuda.is_available():
        yield
        return
    with mock.patch.object(trl_async_grpo, "get_peak_flops_per_device", lambda *args, **kwargs: None):
        yield
