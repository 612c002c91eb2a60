"""[`BebopGRPOTrainer`][bebop_trl.BebopGRPOTrainer]: TRL's GRPO with speculative rollouts drafted by an MTP head."""

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from ..modeling import MTP_LAYOUT, MTPHead, MTPHeadConfig
from ..modeling.teacher_forcing import drafting_slots, policy_hidden_states
from ..modeling.vllm_export import vllm_draft_weights, vllm_speculative_config
from ..rollout.async_worker import AsyncRolloutWorker
from ..rollout.torch_engine import generate_from_ids, padded_prompts
from ..rollout.vllm_backend import (
    SpecDecodeCounters,
    load_colocated_draft_weights,
    push_draft_weights_to_server,
    read_server_counters,
    speculative_llm,
    sync_colocated_policy,
)
from ..rollout.vllm_exactness import VLLMExactness, guard_vllm_exactness
from ..speculative import AcceptanceStats, GenerationOutput
from ..speculative.draft_length import AdaptiveDraftLength, calibrate_draft_length
from ..speculative.engine import eval_mode
from ..speculative.exactness import completion_logprobs
from .acceptance_fit import AcceptanceEntropyFit
from .grpo_config import BebopGRPOConfig
from .head_loss import teacher_forced_head_loss


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
        self._vllm_rollouts = getattr(args, "rollout_backend", "torch") == "vllm"
        self._vllm_exactness = _guard_vllm(args) if self._vllm_rollouts else None
        self._vllm_speculative_config = None
        if self._vllm_rollouts and (head is not None or args.mtp_head is not None):
            self._vllm_speculative_config = _export_vllm_draft(model, args, head)
        with (
            speculative_llm(self._vllm_speculative_config)
            if self._vllm_speculative_config and args.vllm_mode == "colocate"
            else contextlib.nullcontext()
        ):
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        # A plain GRPOConfig has none of the speculative settings: the trainer is then GRPOTrainer.
        self.mtp_head = self._load_head(head) if isinstance(args, BebopGRPOConfig) or head is not None else None
        self._speculative = self.mtp_head is not None or getattr(args, "async_rollouts", False)
        if self._speculative and not self._vllm_rollouts:
            self._check_supported()
        if self._vllm_rollouts and args.vllm_mode == "colocate":
            # TRL calls `vllm_generation.sync_weights()` before generating; route it through vLLM's in-place reload.
            generation = self.vllm_generation
            original_sync = generation.sync_weights
            generation.sync_weights = lambda: sync_colocated_policy(generation, fallback=original_sync)
        # Whether vLLM's drafter still runs older head weights than `mtp_head` (after online updates or a resume).
        self._vllm_draft_stale = False
        self._vllm_counters = SpecDecodeCounters()
        self._rollout_round = 0
        self._eval_round = 0
        self._rollout_seconds = 0.0
        self._step_seconds = 0.0
        self._fit = AcceptanceEntropyFit(seed=args.seed)
        self._head_optimizer: torch.optim.Optimizer | None = None
        self._async_worker: AsyncRolloutWorker | None = None
        self._draft_length: AdaptiveDraftLength | None = None
        self._lookahead = None
        if self._speculative and args.async_rollouts:
            # Remember enough batches to find the current generation batch after gradient accumulation prefetch.
            generate_every = args.steps_per_generation * args.num_iterations
            self._lookahead = _Lookahead(history=generate_every + args.gradient_accumulation_steps + 1)
        self._generation_batch: Any = None
        self._staleness: int | None = None

    # ----------------------------------------------------------------------------------------------- set-up

    def _load_head(self, head: MTPHead | None) -> MTPHead | None:
        policy = self.accelerator.unwrap_model(self.model)
        if head is None and getattr(self.args, "mtp_head", None) is None:
            return None
        if not isinstance(self.args, BebopGRPOConfig):
            raise ValueError("A draft head needs a BebopGRPOConfig (it holds the speculative settings).")
        if head is not None:
            head.bind(policy, check_base_model=False)
        elif self.args.mtp_head == "native":
            head = MTPHead.from_native(policy.config.name_or_path, policy=policy)
        else:
            head = MTPHead.from_pretrained(self.args.mtp_head, policy=policy)
        device = policy.get_input_embeddings().weight.device
        # The head's weights stay in float32: they are the master weights of the online updates.
        return head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

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
        if self._vllm_rollouts and self.mtp_head is not None:
            return self._generate_with_vllm(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if not self._speculative:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None or multimodal_fields:
            raise ValueError("Speculative rollouts support text-only policies; this batch has images.")
        mode = "train" if self.model.training else "eval"
        started = time.perf_counter()
        output = self._rollout(prompt_ids, train=mode == "train")
        elapsed = time.perf_counter() - started
        if mode == "train":
            self._rollout_seconds += elapsed
        self._log_rollout(output, elapsed, mode)
        return output.unpadded(output.completion_ids), output.unpadded(output.logprobs)

    def _generate_with_vllm(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images):
        """TRL's vLLM generation with the head as vLLM's drafter; acceptance read from vLLM's counters."""
        mode = "train" if self.model.training else "eval"
        if self._vllm_draft_stale:
            self._push_head_to_vllm()
        started = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if logprobs is not None and self._vllm_exactness is not None and self._vllm_exactness.logprobs_ok is False:
            logprobs = self._policy_logprobs(prompt_ids, completion_ids)
        elapsed = time.perf_counter() - started
        if mode == "train":
            self._rollout_round += 1
            self._rollout_seconds += elapsed
        counters = self._read_vllm_counters()
        round_counts, self._vllm_counters = counters - self._vllm_counters, counters
        k = self.args.num_speculative_tokens
        counts = round_counts.as_tensor(k)
        tokens = float(sum(len(ids) for ids in completion_ids))
        self._log_round(torch.cat([counts[[0, 2]], counts.new_tensor([tokens]), counts[3:]]), k, elapsed, mode)
        if mode == "train" and logprobs is not None and round_counts.num_drafts:
            # vLLM reports no per-sequence acceptance, so the round is one point of the fit; the mean negative
            # log-prob of the sampled tokens is an unbiased estimate of the policy's mean entropy.
            sampled = [lp for seq in logprobs for lp in seq]
            entropy = -sum(sampled) / max(len(sampled), 1)
            self._add_fit_points(
                torch.tensor([entropy], dtype=torch.float64),
                torch.tensor([round_counts.num_accepted_tokens / max(round_counts.num_draft_tokens, 1)]),
                torch.tensor([float(round_counts.num_draft_tokens)], dtype=torch.float64),
            )
        return completion_ids, logprobs

    def _policy_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The sampling log-probs of vLLM's completions, recomputed with the policy (for a build whose own are
        wrong): vLLM's copy of the policy holds the same weights, so these are the log-probs it sampled from."""
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            ) as policy,
            eval_mode(policy),
        ):
            return completion_logprobs(
                policy,
                prompt_ids,
                completion_ids,
                temperature=self.temperature,
                top_k=self.top_k or 0,
                top_p=self.top_p,
                batch_size=self.args.per_device_train_batch_size,
            )

    def _read_vllm_counters(self) -> SpecDecodeCounters:
        generation = self.vllm_generation
        if generation.mode == "colocate":
            return SpecDecodeCounters.from_llm_metrics(generation.llm.get_metrics())
        if not self.accelerator.is_main_process:
            return SpecDecodeCounters()  # only the main process talks to the server; the gather sums
        base_url = generation.server_base_url or f"http://{generation.server_host}:{generation.server_port}"
        return read_server_counters(base_url)

    @torch.no_grad()
    def _push_head_to_vllm(self) -> None:
        """Loads the head's current weights into vLLM's drafter (in process, or the server's)."""
        weights = vllm_draft_weights(self.mtp_head)
        if self.vllm_generation.mode == "colocate":
            load_colocated_draft_weights(self.vllm_generation.llm, weights)
        elif self.accelerator.is_main_process:  # TRL's client lives on the main process only
            push_draft_weights_to_server(self.vllm_generation.vllm_client, weights)
        self._vllm_draft_stale = False

    def _rollout(self, prompt_ids: list[list[int]], train: bool) -> GenerationOutput:
        """This round's rollouts: from the background worker when it has them and they are fresh enough, else
        generated now with the current weights."""
        if train:
            round_index = self._rollout_round
            self._rollout_round += 1
        else:
            # Evaluation rounds draw from their own stream, so they neither repeat nor shift the training rounds.
            round_index = -1 - self._eval_round
            self._eval_round += 1
        self._staleness = None
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as policy,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            if self.args.adaptive_draft_length and self.mtp_head is not None and self._draft_length is None:
                # Step costs depend on the batch: measured once, on the first round's prompts.
                self._draft_length = calibrate_draft_length(
                    policy,
                    self.mtp_head,
                    *padded_prompts(policy, self._tokenizer, prompt_ids),
                    max_draft_tokens=self.args.num_speculative_tokens,
                    temperature=self.temperature,
                )
            if not (train and self.args.async_rollouts):
                return self._generate_now(policy, prompt_ids, round_index)
            if self._async_worker is None:
                self._async_worker = AsyncRolloutWorker(
                    policy, self.mtp_head, self._tokenizer, **self._engine_kwargs()
                )
            rollout = self._async_worker.take(prompt_ids)
            if rollout is not None and self.state.global_step - rollout.version <= self.args.max_staleness:
                output, self._staleness = rollout.output, self.state.global_step - rollout.version
            else:
                output, self._staleness = self._generate_now(policy, prompt_ids, round_index), 0
            self._submit_next_round(policy, round_index + 1)
        return output

    def _generate_now(self, policy: nn.Module, prompt_ids: list[list[int]], round_index: int) -> GenerationOutput:
        return generate_from_ids(
            policy,
            self._tokenizer,
            prompt_ids,
            head=self.mtp_head,
            generator=self._round_generator(round_index),
            **self._engine_kwargs(),
            **self._sampling_kwargs(),
        )

    def _submit_next_round(self, policy: nn.Module, round_index: int) -> None:
        """Starts generating the next generation batch in the background, if the data loader can show it."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        upcoming = None
        if self._lookahead is not None and self._generation_batch is not None:
            upcoming = self._lookahead.peek_after(self._generation_batch, generate_every)
        if upcoming is None:
            return
        prompt_ids, _, _ = self._tokenize_prompts([example["prompt"] for example in upcoming])
        self._async_worker.submit(
            prompt_ids,
            policy,
            self.mtp_head,
            version=self.state.global_step,
            generator=self._round_generator(round_index),
            **self._sampling_kwargs(),
        )

    def _engine_kwargs(self) -> dict[str, Any]:
        # One draft-length policy for every round (and the background worker): it keeps learning acceptance.
        return dict(
            num_speculative_tokens=self.args.num_speculative_tokens,
            draft_sampling=self.args.draft_sampling,
            draft_length=self._draft_length,
        )

    def _sampling_kwargs(self) -> dict[str, Any]:
        return dict(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
            eos_token_id=list(self.eos_token_ids),
        )

    def _round_generator(self, round_index: int) -> torch.Generator:
        """A generator seeded by the run's seed, the process and the round (negative for evaluation rounds): runs
        are reproducible whether a round is generated in the background or not."""
        seed = (self.args.seed * 1_000_003 + self.accelerator.process_index * 10_007 + round_index) % (2**63)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples`, through a lookahead with async rollouts so the next batch can be peeked."""
        # With async rollouts every batch passes through the lookahead, which can read the next generation batch.
        if self._lookahead is not None:
            epoch_iterator = self._lookahead.wrap(epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    # ------------------------------------------------------------------------------------------------- scoring

    def _generate_and_score_completions(self, inputs):
        train = self.model.training
        if train:
            self._generation_batch = inputs
        output = super()._generate_and_score_completions(inputs)
        if train and self._staleness is not None:
            self._correct_stale_rollouts(output)
        if (
            train
            and self.mtp_head is not None
            and self.args.mtp_online_update
            and self._rollout_round % self.args.mtp_online_update_interval == 0
        ):
            self._update_head_online(output)
            self._vllm_draft_stale = self._vllm_rollouts
        return output

    @torch.no_grad()
    def _correct_stale_rollouts(self, output: dict[str, Any]) -> None:
        """Importance-sampling correction of rollouts from an older policy snapshot, as TRL corrects vLLM's.

        The ratio between the current policy's and the sampling log-probs is truncated or masked as the
        `vllm_importance_sampling_*` settings say and multiplies the advantages (every GRPO loss but `vespo` is
        positively homogeneous in the advantage, so this equals TRL's multiplication of the per-token loss).
        """
        mode = "train"
        self._metrics[mode]["rollout/staleness"].append(float(self._staleness))
        if self._staleness == 0 or not self.args.vllm_importance_sampling_correction:
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
        is_completion = torch.cat([torch.zeros_like(output["prompt_mask"]), output["completion_mask"]], dim=1).bool()
        policy = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), eval_mode(policy):
            policy_hidden, aux_hidden = policy_hidden_states(policy, input_ids, attention_mask, head.aux_layers)
        head.train().requires_grad_(True)
        try:
            result = teacher_forced_head_loss(
                head,
                input_ids,
                policy_hidden,
                attention_mask,
                num_steps=args.num_speculative_tokens,
                loss_type=args.mtp_online_update,
                temperature=self.temperature,
                slot_mask=drafting_slots(is_completion, args.num_speculative_tokens),
                aux_hidden=aux_hidden,
            )
            if not torch.isfinite(result.loss):
                raise FloatingPointError(
                    f"The online head update's {args.mtp_online_update} loss is {result.loss.item()} at step "
                    f"{self.state.global_step}; lower mtp_online_learning_rate or mtp_online_max_grad_norm."
                )
            result.loss.backward()
            self._average_head_gradients()
            grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), args.mtp_online_max_grad_norm)
            self._head_optimizer.step()
            self._head_optimizer.zero_grad(set_to_none=True)
        finally:
            head.eval().requires_grad_(False)
        metrics = self._metrics["train"]
        metrics["mtp_online/loss"].append(self.accelerator.gather(result.loss.detach()).mean().item())
        metrics["mtp_online/grad_norm"].append(float(grad_norm))
        for j, acceptance in enumerate(self.accelerator.gather(result.acceptance.unsqueeze(0)).mean(0).tolist()):
            metrics[f"mtp_online/acceptance_step_{j + 1}"].append(acceptance)

    def _average_head_gradients(self) -> None:
        """Averages the head's gradients over processes, so every process keeps the same head."""
        if self.accelerator.num_processes == 1:
            return
        for param in self.mtp_head.parameters():
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    # ----------------------------------------------------------------------------------------------- metrics

    def _log_rollout(self, output: GenerationOutput, seconds: float, mode: str) -> None:
        """Logs one round's acceptance and speed, summed over processes, and feeds the acceptance-entropy fit."""
        stats = output.stats
        local = torch.tensor(
            [
                stats.num_drafts,
                stats.num_accepted_tokens,
                float(output.completion_lengths.sum()),
                *stats.accepted_per_position.tolist(),
            ],
            dtype=torch.float64,
        )
        self._log_round(local, stats.num_speculative_tokens, seconds, mode)
        if stats.num_speculative_tokens and mode == "train":
            self._update_fit(stats)

    def _log_round(self, local: torch.Tensor, k: int, seconds: float, mode: str) -> None:
        """Logs a round from this process's [drafts, accepted tokens, completion tokens, accepted per position]."""
        device = self.accelerator.device
        total = self.accelerator.gather(local.to(device).unsqueeze(0)).sum(0).tolist()
        drafts, accepted, tokens = total[:3]
        slowest = self.accelerator.gather(torch.tensor([seconds], device=device)).max().item()
        metrics = self._metrics[mode]
        metrics["rollout/tokens_per_second"].append(tokens / max(slowest, 1e-9))
        metrics["rollout/seconds"].append(slowest)
        if k == 0:
            return
        metrics["rollout/draft_tokens"].append(drafts * k)
        metrics["rollout/acceptance_rate"].append(accepted / max(drafts * k, 1))
        metrics["rollout/mean_accepted_length"].append(accepted / max(drafts, 1))
        for j, count in enumerate(total[3:]):
            metrics[f"rollout/acceptance_position_{j + 1}"].append(count / max(drafts, 1))

    def _update_fit(self, stats: AcceptanceStats) -> None:
        """Adds one point per completion: (mean entropy, acceptance rate), weighted by its drafted tokens."""
        self._add_fit_points(
            stats.mean_entropy_per_row.double(),
            stats.row_acceptance_rate,
            stats.draft_tokens_per_row.double(),
        )

    def _add_fit_points(self, entropy: torch.Tensor, acceptance: torch.Tensor, weight: torch.Tensor) -> None:
        points = torch.stack([entropy, acceptance, weight]).to(self.accelerator.device)
        points = self.accelerator.gather(points.T.contiguous()).cpu()
        self._fit.update(points[:, 0], points[:, 1], points[:, 2], step=self.state.global_step)
        result = self._fit.result()
        if result is not None:
            for name in ("slope", "intercept", "r"):
                self._metrics["train"][f"acceptance_entropy/{name}"].append(result[name])

    def training_step(self, model, inputs, num_items_in_batch):
        """`GRPOTrainer.training_step`, timed to log the rollout share of the optimizer step's time."""
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_seconds += time.perf_counter() - started
        if self._speculative and self._step % self.current_gradient_accumulation_steps == 0:
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
            if self._async_worker is not None:
                self._async_worker.close()
                self._async_worker = None
        if self.args.should_save and self.mtp_head is not None:
            self._save_fit(self.args.output_dir, plot=True)
            if self.args.mtp_online_update:
                self.mtp_head.save_pretrained(os.path.join(self.args.output_dir, HEAD_DIR))
        return result

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self._speculative or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        self._save_fit(folder, plot=False)
        state = {"rollout_round": self._rollout_round, "fit": self._fit.state_dict()}
        if self.mtp_head is not None and self.args.mtp_online_update:
            self.mtp_head.save_pretrained(os.path.join(folder, HEAD_DIR))
            if self._head_optimizer is not None:
                state["head_optimizer"] = self._head_optimizer.state_dict()
        torch.save(state, os.path.join(folder, TRAINER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on every resume (also under DeepSpeed, unlike `_load_from_checkpoint`).
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._speculative:
            return
        state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            return
        state = torch.load(state_file, weights_only=True)
        self._rollout_round = state["rollout_round"]
        self._fit.load_state_dict(state["fit"])
        head_dir = os.path.join(checkpoint, HEAD_DIR)
        if self.mtp_head is not None and self.args.mtp_online_update and os.path.isdir(head_dir):
            saved = MTPHead.from_pretrained(head_dir, dtype=torch.float32)
            self.mtp_head.load_state_dict(saved.state_dict())
            self._vllm_draft_stale = self._vllm_rollouts
            if "head_optimizer" in state:
                self._head_optimizer = torch.optim.AdamW(
                    self.mtp_head.parameters(), lr=self.args.mtp_online_learning_rate
                )
                self._head_optimizer.load_state_dict(state["head_optimizer"])

    def _save_fit(self, folder: str, plot: bool) -> None:
        os.makedirs(folder, exist_ok=True)
        self._fit.save_json(os.path.join(folder, f"{FIT_NAME}.json"))
        if plot:
            self._fit.save_plot(os.path.join(folder, f"{FIT_NAME}.png"), title=self.args.run_name)


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


class _Lookahead:
    """Iterates the trainer's epoch iterator, and lets the trainer read batches it has not reached yet.

    Whatever iterator the trainer uses (a fresh epoch, or the one that skips the batches of a resumed run), its
    batches come through here in order; `peek_after` pulls later ones into a buffer that `__next__` serves first.
    """

    def __init__(self, history: int):
        self._source: Iterator | None = None
        self._buffer: deque = deque()
        self._recent: deque = deque(maxlen=history)

    def wrap(self, iterator: Iterator) -> "_Lookahead":
        if iterator is not self._source and iterator is not self:
            self._source, self._buffer = iterator, deque()
            self._recent.clear()
        return self

    def __iter__(self) -> "_Lookahead":
        return self

    def __next__(self) -> Any:
        item = self._buffer.popleft() if self._buffer else next(self._source)
        self._recent.append(item)
        return item

    def peek_after(self, item: Any, distance: int) -> Any | None:
        """The batch `distance` positions after `item` (a recent batch), or None if the epoch ends first."""
        recent = list(self._recent)
        index = next((i for i in range(len(recent) - 1, -1, -1) if recent[i] is item), None)
        if index is None:
            return None
        ahead = distance - (len(recent) - 1 - index)  # position of the wanted batch after the last one served
        if ahead <= 0:
            return recent[index + distance]
        while len(self._buffer) < ahead:
            try:
                self._buffer.append(next(self._source))
            except StopIteration:
                return None
        return self._buffer[ahead - 1]


def _prompt_and_completion(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of a scored GRPO batch's prompts followed by their completions."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    return input_ids, torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)


def _guard_vllm(args: GRPOConfig) -> VLLMExactness | None:
    """The exactness guard of vLLM rollouts (see [`guard_vllm_exactness`][bebop_trl.rollout.vllm_exactness.guard_vllm_exactness]).

    In colocate mode every process applies the fixes of its own engine; the local main process runs the self-test
    first, so the others read its cached result. In server mode the engine is the server's, which
    `bebop-trl vllm-serve` guards.
    """
    from accelerate import PartialState

    if not isinstance(args, BebopGRPOConfig) or args.vllm_mode != "colocate":
        return None
    with PartialState().local_main_process_first():
        return guard_vllm_exactness(
            apply_shims=args.vllm_compat_shims, self_test=args.vllm_self_test, allow_inexact=args.vllm_allow_inexact
        )


def _export_vllm_draft(model: Any, args: BebopGRPOConfig, head: MTPHead | None) -> dict[str, Any]:
    """Writes the head as vLLM's draft checkpoint under `output_dir/vllm_draft` (once per machine) and returns the
    speculative config of vLLM's engine. A native Qwen3.5 / Qwen3-Next head is the policy checkpoint itself."""
    from accelerate import PartialState

    policy_path = model if isinstance(model, str) else model.config.name_or_path
    if head is None and args.mtp_head == "native":
        native = MTPHeadConfig(layout=MTP_LAYOUT)  # vLLM reads the native mtp.* weights from the policy itself
        return vllm_speculative_config(
            native, policy_path, num_speculative_tokens=args.num_speculative_tokens, draft_sampling=args.draft_sampling
        )
    if head is None:
        head = MTPHead.from_pretrained(args.mtp_head)
    folder = os.path.join(args.output_dir, "vllm_draft")
    state = PartialState()
    with state.local_main_process_first():
        if state.is_local_main_process:
            target_config = None if isinstance(model, str) else model.config
            if target_config is None and head.config.layout == MTP_LAYOUT:
                from transformers import AutoConfig

                target_config = AutoConfig.from_pretrained(policy_path)
            head.export_vllm(folder, target_config=target_config)
    return vllm_speculative_config(
        head.config, folder, num_speculative_tokens=args.num_speculative_tokens, draft_sampling=args.draft_sampling
    )
