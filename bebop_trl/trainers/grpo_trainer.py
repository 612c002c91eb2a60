"""[`BebopGRPOTrainer`][bebop_trl.BebopGRPOTrainer]: TRL's GRPO with speculative rollouts drafted by an MTP head."""

import contextlib
import functools
import math
import os
import time
from typing import Any

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from ..modeling import MTPHead
from ..modeling.native import NATIVE_HEAD
from ..modeling.vllm_export import rollout_drafts_speculative_config
from ..rollout.base import RolloutBackend, RolloutResult
from ..rollout.engine_backend import BackgroundEngineRollout, EngineRollout
from ..rollout.vllm_backend import require_block_verification, route_policy_sync_through_reload, speculative_llm
from ..rollout.vllm_rollout import export_draft_for_vllm, guard_colocated_vllm, vllm_rollout
from ..speculative import AcceptanceCounts
from .acceptance_fit import AcceptanceEntropyFit
from .grpo_config import VLLM_ROLLOUT_DRAFTS_WITH_HEAD, BebopGRPOConfig
from .head_loss import (
    as_master_head,
    average_head_gradients,
    load_head,
    log_online_head_step,
    online_head_step,
)


FIT_NAME = "acceptance_entropy_fit"
HEAD_DIR = "mtp_head"
TRAINER_STATE_NAME = "bebop_state.pt"


class BebopGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose rollouts are drafted by an MTP head and verified by the policy, exactly.

    A drop-in replacement: the constructor and every GRPO behaviour are TRL's, so a script using `GRPOTrainer` works
    by renaming `GRPOTrainer` / `GRPOConfig` to `BebopGRPOTrainer` / `BebopGRPOConfig`. Without a head (and without
    async rollouts) it is `GRPOTrainer`. With a head, every rollout round runs the
    [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator] on the current policy weights; the completions are
    distributed exactly as the policy's own samples, and their sampling log-probs are handed to TRL.

    Each round logs the acceptance rate, mean accepted length, acceptance per draft position, drafted tokens,
    rollout tokens per second and the rollout share of the step time; over the run, a weighted linear fit of
    per-completion acceptance against the policy's entropy is logged and written to
    `output_dir/acceptance_entropy_fit.json` (and `.png` at the end of training).

    Args:
        model: The policy, as for `trl.GRPOTrainer`.
        reward_funcs: Reward functions, as for `trl.GRPOTrainer`.
        args: The configuration; a plain `trl.GRPOConfig` gives TRL's behaviour.
        *trainer_args: Further positional arguments of `trl.GRPOTrainer`.
        head: A draft head to use instead of loading `args.mtp_head`.
        **trainer_kwargs: Keyword arguments of `trl.GRPOTrainer` (`train_dataset`, `processing_class`,
            `peft_config`, ...).

    Example:
        ```python
        from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer

        config = BebopGRPOConfig("grpo-out", mtp_head="my-org/smollm2-mtp-head", num_speculative_tokens=3)
        trainer = BebopGRPOTrainer("HuggingFaceTB/SmolLM2-135M-Instruct", reward_fn, args=config, train_dataset=ds)
        trainer.train()
        ```
    """

    def __init__(
        self,
        model: "str | PreTrainedModel",
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        *trainer_args: Any,
        head: MTPHead | None = None,
        **trainer_kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = BebopGRPOConfig(f"{os.path.basename(str(name).rstrip('/')) or 'policy'}-GRPO")
        vllm_rollouts = getattr(args, "rollout_backend", "torch") == "vllm"
        colocated_block = vllm_rollouts and args.vllm_mode == "colocate" and args.rejection_sample_method == "block"
        speculative_config, loaded_head = None, None
        if vllm_rollouts and args.rollout_drafts and head is not None:
            raise ValueError(VLLM_ROLLOUT_DRAFTS_WITH_HEAD)
        if vllm_rollouts and (head is not None or args.mtp_head is not None):
            if head is None and args.mtp_head != NATIVE_HEAD:
                # Read once: exported for vLLM before TRL builds its engine, bound to the policy after.
                loaded_head = MTPHead.from_pretrained(args.mtp_head)
            speculative_config = export_draft_for_vllm(model, args, head or loaded_head)
        elif vllm_rollouts and args.rollout_drafts and args.vllm_mode == "colocate":
            speculative_config = rollout_drafts_speculative_config(
                num_speculative_tokens=args.num_speculative_tokens,
                rejection_sample_method=args.rejection_sample_method,
            )
        if speculative_config and colocated_block:  # in server mode `bebop-trl vllm-serve` checks its own vLLM
            require_block_verification(speculative_config["method"])
        exactness = guard_colocated_vllm(args) if vllm_rollouts and isinstance(args, BebopGRPOConfig) else None
        with (
            speculative_llm(speculative_config)
            if speculative_config and args.vllm_mode == "colocate"
            else contextlib.nullcontext()
        ):
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        if speculative_config and colocated_block:  # the engine's own choice of model runner
            require_block_verification(speculative_config["method"], self.vllm_generation.llm.llm_engine.vllm_config)
        # A plain GRPOConfig has none of the speculative settings: the trainer is then GRPOTrainer.
        self.mtp_head = (
            self._load_head(head, loaded_head) if isinstance(args, BebopGRPOConfig) or head is not None else None
        )
        self._rollout: RolloutBackend | None = None
        if vllm_rollouts:
            if args.vllm_mode == "colocate":
                # TRL syncs the policy into vLLM before generating, with or without a head.
                route_policy_sync_through_reload(self.vllm_generation)
            if self.mtp_head is not None or args.rollout_drafts:
                trl_generate = functools.partial(GRPOTrainer._generate_single_turn, self)
                self._rollout = vllm_rollout(self, self.mtp_head, trl_generate, exactness)
        elif (
            self.mtp_head is not None
            or getattr(args, "async_rollouts", False)
            or getattr(args, "rollout_drafts", False)
        ):
            self._check_supported()
            backend = BackgroundEngineRollout if args.async_rollouts else EngineRollout
            self._rollout = backend(self, self.mtp_head)
        # The staleness of the round being scored (None: generated by the current policy, nothing to correct).
        self._round_staleness: int | None = None
        self._rollout_seconds = 0.0
        self._step_seconds = 0.0
        self._fit = AcceptanceEntropyFit(seed=args.seed)
        self._head_optimizer: torch.optim.Optimizer | None = None

    # ----------------------------------------------------------------------------------------------- set-up

    def _load_head(self, head: MTPHead | None, loaded_head: MTPHead | None) -> MTPHead | None:
        """The head given to the trainer or named by `args.mtp_head` (`loaded_head` if already read), bound to the
        policy as the master weights of online updates."""
        policy = self.accelerator.unwrap_model(self.model)
        if head is None and getattr(self.args, "mtp_head", None) is None:
            return None
        if not isinstance(self.args, BebopGRPOConfig):
            raise ValueError("A draft head needs a BebopGRPOConfig (it holds the speculative settings).")
        if head is not None:
            head.bind(policy, check_base_model=False)
        else:
            head = load_head(policy, self.args.mtp_head, loaded=loaded_head)
        return as_master_head(head, policy)

    def _check_supported(self) -> None:
        """Rejects GRPO options the speculative engine does not implement, naming the way out."""
        way_out = "Unset it, or set mtp_head=None and async_rollouts=False to generate with transformers."
        unsupported = {
            "min_p": self.min_p is not None,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "generation_kwargs": bool(self.args.generation_kwargs),
            "use_transformers_continuous_batching": self.use_transformers_continuous_batching,
            # An environment's methods are added to `tools`; only the tools the user passed count here.
            "tools": bool(self._standalone_tools),
            "rollout_func": self.rollout_func is not None,
            "environment_factory": self.environment_factories is not None,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise ValueError(f"Speculative and async rollouts do not support {name}. {way_out}")

    # ------------------------------------------------------------------------------------------------ rollouts

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._rollout is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        mode = "train" if self.model.training else "eval"
        result = self._rollout.generate(
            prompt_ids,
            train=mode == "train",
            images=images,
            multimodal_fields=multimodal_fields,
            num_generations=num_generations,
            has_tool_images=has_tool_images,
        )
        self._round_staleness = result.staleness
        if mode == "train":
            self._rollout_seconds += result.seconds
        self._log_rollout(result, mode)
        return result.completion_ids, result.logprobs

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples`, with the epoch iterator shown to the rollout backend (a backend that
        generates ahead reads the next generation batch from it)."""
        if self._rollout is not None:
            epoch_iterator = self._rollout.watch_epoch(epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    # ------------------------------------------------------------------------------------------------- scoring

    def _generate_and_score_completions(self, inputs):
        train = self.model.training
        if train and self._rollout is not None:
            self._rollout.start_round(inputs)
        self._round_staleness = None
        output = super()._generate_and_score_completions(inputs)
        if train and self._round_staleness is not None:
            self._correct_stale_rollouts(output)
        if (
            train
            and self.mtp_head is not None
            and self.args.mtp_online_loss
            and self._rollout.rounds % self.args.mtp_online_update_interval == 0
        ):
            self._update_head_online(output)
            self._rollout.head_updated()
        return output

    @torch.no_grad()
    def _correct_stale_rollouts(self, output: dict[str, Any]) -> None:
        """Importance-sampling correction of rollouts from an older policy snapshot, as TRL corrects vLLM's.

        The ratio between the current policy's and the sampling log-probs is truncated or masked as the
        `vllm_importance_sampling_*` settings say and multiplies the advantages (every GRPO loss but `vespo` is
        positively homogeneous in the advantage, so this equals TRL's multiplication of the per-token loss).
        """
        mode = "train"
        self._metrics[mode]["rollout/staleness"].append(float(self._round_staleness))
        if self._round_staleness == 0 or not self.args.vllm_importance_sampling_correction:
            return
        completion_mask = output["completion_mask"]
        if "old_per_token_logps" not in output:
            input_ids, attention_mask = _prompt_and_completion(output)
            output["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        ratio = importance_sampling_ratio(
            output["old_per_token_logps"],
            output["sampling_per_token_logps"],
            completion_mask,
            self.args.vllm_importance_sampling_mode,
            self.args.vllm_importance_sampling_clip_min,
            self.args.vllm_importance_sampling_clip_max,
        )
        if self.loss_type == "vespo":
            output["importance_sampling_ratio"] = ratio
        else:
            output["advantages"] = output["advantages"].unsqueeze(-1) * ratio
        valid = ratio.expand_as(completion_mask)[completion_mask.bool()]
        stats = torch.stack([valid.mean(), valid.min(), valid.max()]) if valid.numel() else torch.ones(3)
        stats = self.accelerator.gather(stats.to(self.accelerator.device).unsqueeze(0))
        self._metrics[mode]["sampling/importance_sampling_ratio/mean"].append(stats[:, 0].mean().item())
        self._metrics[mode]["sampling/importance_sampling_ratio/min"].append(stats[:, 1].min().item())
        self._metrics[mode]["sampling/importance_sampling_ratio/max"].append(stats[:, 2].max().item())

    # ------------------------------------------------------------------------------------------ online updates

    def _update_head_online(self, output: dict[str, Any]) -> None:
        """One optimizer step of the head on this round's rollouts; the policy only provides hidden states."""
        head, args = self.mtp_head, self.args
        if self._head_optimizer is None:
            self._head_optimizer = torch.optim.AdamW(head.parameters(), lr=args.mtp_online_learning_rate)
        input_ids, attention_mask = _prompt_and_completion(output)
        is_completion = torch.cat([torch.zeros_like(output["prompt_mask"]), output["completion_mask"]], dim=1)
        result, grad_norm = online_head_step(
            head,
            self._head_optimizer,
            self.accelerator.unwrap_model(self.model),
            input_ids,
            attention_mask,
            is_completion,
            num_steps=args.num_speculative_tokens,
            loss_type=args.mtp_online_loss,
            temperature=self.temperature,
            max_grad_norm=args.mtp_online_max_grad_norm,
            average_gradients=functools.partial(average_head_gradients, self.accelerator, head),
        )
        log_online_head_step(self._metrics["train"], self.accelerator, result, grad_norm)

    # ----------------------------------------------------------------------------------------------- metrics

    def _log_rollout(self, result: RolloutResult, mode: str) -> None:
        """Logs one round's acceptance and speed, summed over processes, and feeds the acceptance-entropy fit."""
        device = self.accelerator.device
        k = result.num_speculative_tokens
        local = torch.cat([result.counts.as_tensor(k), torch.tensor([float(result.num_completion_tokens)])])
        total = self.accelerator.gather(local.to(device, torch.float64).unsqueeze(0)).sum(0).cpu()
        slowest = self.accelerator.gather(torch.tensor([result.seconds], device=device)).max().item()
        metrics = self._metrics[mode]
        metrics["rollout/tokens_per_second"].append(total[-1].item() / max(slowest, 1e-9))
        metrics["rollout/seconds"].append(slowest)
        if k:
            for name, value in AcceptanceCounts.from_tensor(total[:-1]).metrics("rollout/").items():
                metrics[name].append(value)
        if result.fit_points is not None:
            self._add_fit_points(*result.fit_points)

    def _add_fit_points(self, entropy: torch.Tensor, acceptance: torch.Tensor, weight: torch.Tensor) -> None:
        points = torch.stack([entropy, acceptance, weight]).to(self.accelerator.device)
        points = self.accelerator.gather(points.T.contiguous()).cpu()
        self._fit.update(points[:, 0], points[:, 1], points[:, 2], step=self.state.global_step)
        for name, value in self._fit.metrics().items():
            self._metrics["train"][name].append(value)

    def training_step(self, model, inputs, num_items_in_batch):
        """`GRPOTrainer.training_step`, timed to log the rollout share of the optimizer step's time."""
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_seconds += time.perf_counter() - started
        if self._rollout is not None and self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["rollout/share_of_step_time"].append(
                self._rollout_seconds / max(self._step_seconds, 1e-9)
            )
            self._rollout_seconds = self._step_seconds = 0.0
        return loss

    # ------------------------------------------------------------------------------------ checkpoints and end

    def train(self, *args: Any, **kwargs: Any):
        """Runs `trl.GRPOTrainer.train`, then writes the acceptance-entropy fit (JSON and PNG) and, if the head
        was updated online, the head to `output_dir/mtp_head`."""
        try:
            result = super().train(*args, **kwargs)
        finally:
            if self._rollout is not None:
                self._rollout.close()
        if self.args.should_save and self.mtp_head is not None:
            self._fit.save(self.args.output_dir, FIT_NAME, title=self.args.run_name)
            if self.args.mtp_online_loss:
                self.mtp_head.save_pretrained(os.path.join(self.args.output_dir, HEAD_DIR))
        return result

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._rollout is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        self._fit.save(folder, FIT_NAME, plot=False)
        state = {**self._rollout.state_dict(), "fit": self._fit.state_dict()}
        if self.mtp_head is not None and self.args.mtp_online_loss:
            self.mtp_head.save_pretrained(os.path.join(folder, HEAD_DIR))
            if self._head_optimizer is not None:
                state["head_optimizer"] = self._head_optimizer.state_dict()
        torch.save(state, os.path.join(folder, TRAINER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on every resume (also under DeepSpeed, unlike `_load_from_checkpoint`).
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self._rollout is None:
            return
        state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            return
        state = torch.load(state_file, weights_only=True)
        self._rollout.load_state_dict(state)
        self._fit.load_state_dict(state["fit"])
        head_dir = os.path.join(checkpoint, HEAD_DIR)
        if self.mtp_head is not None and self.args.mtp_online_loss and os.path.isdir(head_dir):
            saved = MTPHead.from_pretrained(head_dir, dtype=torch.float32)
            self.mtp_head.load_state_dict(saved.state_dict())
            self._rollout.head_updated()
            if "head_optimizer" in state:
                self._head_optimizer = torch.optim.AdamW(
                    self.mtp_head.parameters(), lr=self.args.mtp_online_learning_rate
                )
                self._head_optimizer.load_state_dict(state["head_optimizer"])


def importance_sampling_ratio(
    current_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """TRL's importance-sampling ratio between the training policy and the policy that sampled the tokens.

    Args:
        current_logps: [B, T] log-probs of the completion tokens under the policy being trained.
        sampling_logps: [B, T] log-probs under the policy that sampled them.
        mask: [B, T] 1 for completion tokens.
        mode: `token_truncate`, `token_mask`, `sequence_truncate` or `sequence_mask`.
        clip_min: Lower bound (None: none).
        clip_max: Upper bound (None: none).

    Returns:
        [B, T] per-token or [B, 1] per-sequence ratios, truncated to the bounds or set to 0 outside them.
    """
    granularity, constraint = mode.split("_")
    if granularity not in ("token", "sequence") or constraint not in ("truncate", "mask"):
        raise ValueError(f"Unknown importance sampling mode {mode!r}.")
    log_ratio = torch.nan_to_num((current_logps - sampling_logps) * mask, nan=0.0)
    if granularity == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True)
    ratio = log_ratio.exp()
    if constraint == "truncate":
        return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def _prompt_and_completion(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of a scored GRPO batch's prompts followed by their completions."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    return input_ids, torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
