"""[`MTPTrainer`][bebop_trl.MTPTrainer]: pre-RL training of an MTP head on a frozen policy."""

import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from datasets import Dataset
from huggingface_hub import CommitInfo
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import PushInProgress, hf_api

from ..modeling import MTPHead, draft_vocab_mass, select_draft_vocab
from ..modeling.hub import CONFIG_NAME, MODEL_CARD_NAME, WEIGHTS_NAME, head_model_card, load_tensors
from ..modeling.policy_io import load_policy_io
from ..modeling.teacher_forcing import completion_token_mask, drafting_slots, policy_hidden_states
from ..ops import MTPLossOutput
from ..rollout.torch_engine import generate_from_ids
from ..speculative import DRAFT_SAMPLING_MODES
from .distill_corpus import (
    AUX_HIDDEN_STATES,
    HIDDEN_STATES,
    POLICY_LOG_NORMALIZER,
    CorpusCollator,
    is_distill_corpus,
    prepare_corpus,
)
from .head_loss import load_head, teacher_forced_head_loss
from .mtp_config import MTPConfig
from .mtp_data import PROMPT_LENGTH, needs_self_distillation, prompt_ids_of, self_distill, tokenize_dataset


TRAINING_ARGS_NAME = "training_args.json"
# Everything a head repo holds: what `save_model` writes and the only files a push uploads.
HEAD_REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, TRAINING_ARGS_NAME)


class MTPTrainingModule(nn.Module):
    """The frozen policy and the trainable head as one module, so that `Trainer` and DDP see a single model.

    Its forward scores one batch: a policy forward for the hidden states (no gradient; none when the batch brings
    them from a self-distilled corpus), the head unrolled over
    `num_mtp_steps` steps with teacher forcing, and [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] on every valid slot.
    """

    def __init__(self, policy: PreTrainedModel, head: MTPHead, args: MTPConfig):
        super().__init__()
        if any(param.is_meta for param in policy.parameters()):
            # Only what the head needs is loaded (`load_policy_io`, on its device already): kept out of the module
            # tree, so that placing this module never touches the layers that hold no data.
            object.__setattr__(self, "policy", policy)
        else:
            self.policy = policy
        self.head = head
        self.loss_kwargs = dict(
            loss_type=args.loss_type,
            temperature=args.temperature,
            kl_scale=args.lk_kl_scale,
            kl_decay=args.lk_kl_decay,
        )
        self.loss_kwargs.update({k: v for k in ("token_tile", "vocab_tile") if (v := getattr(args, k)) is not None})
        self.num_mtp_steps = args.num_mtp_steps
        self.completion_only_loss = args.completion_only_loss

    def train(self, mode: bool = True) -> "MTPTrainingModule":
        """Sets the head's training mode; the policy always stays in eval mode (no dropout).

        Args:
            mode: Training mode of the head.

        Returns:
            The module itself.
        """
        super().train(mode)
        self.policy.eval()  # frozen: no dropout, whatever mode the trainer sets
        return self

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        prompt_length: torch.LongTensor | None = None,
        loss_type: str | None = None,
        hidden_states: torch.Tensor | None = None,
        aux_hidden_states: torch.Tensor | None = None,
        policy_log_normalizer: torch.Tensor | None = None,
    ) -> MTPLossOutput:
        """Scores one batch: the head's loss against the frozen policy over every valid slot.

        Args:
            input_ids: [B, L] token ids, padded.
            attention_mask: [B, L] 1 for real tokens (default: all).
            prompt_length: [B] prompt tokens per row; with `completion_only_loss`, only the slots a rollout drafts
                (starts whose next token is a completion token) count.
            loss_type: Overrides the configured loss for this batch (the KL warm start uses `"kl"`).
            hidden_states: [B, L, H] the policy's final hidden states, stored with the data (a self-distilled
                corpus); None runs the policy for them.
            aux_hidden_states: [B, L, A * H] the hidden states entering the policy's layers that an `eagle3` head
                reads, stored with the data (a corpus built with the head's `aux_layers`).
            policy_log_normalizer: [B, L] the log-normaliser of the policy's logits at every position, stored with
                the data (a corpus built with `log_normalizer=True`); used at temperature 1 by draft-vocabulary heads.

        Returns:
            The loss and its per-step acceptance statistics.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        aux_layers = self.head.aux_layers
        if hidden_states is not None:
            if aux_layers and aux_hidden_states is None:
                raise ValueError(
                    f"This eagle3 head reads the policy's layers {list(aux_layers)}, but the corpus stores only the "
                    "final hidden states: build it with build_distill_corpus(..., aux_layers=head.aux_layers)."
                )
            dtype = self.head.fc.weight.dtype
            policy_hidden = hidden_states.to(dtype)
            aux_hidden = None if aux_hidden_states is None or not aux_layers else aux_hidden_states.to(dtype)
        else:
            with torch.no_grad():
                policy_hidden, aux_hidden = policy_hidden_states(self.policy, input_ids, attention_mask, aux_layers)
        slot_mask = None
        if self.completion_only_loss and prompt_length is not None:
            slot_mask = drafting_slots(completion_token_mask(attention_mask, prompt_length), self.num_mtp_steps)
        return teacher_forced_head_loss(
            self.head,
            input_ids,
            policy_hidden,
            attention_mask,
            num_steps=self.num_mtp_steps,
            slot_mask=slot_mask,
            aux_hidden=aux_hidden,
            policy_log_normalizer=policy_log_normalizer if hidden_states is not None else None,
            **{**self.loss_kwargs, "loss_type": loss_type or self.loss_kwargs["loss_type"]},
        )


class MTPTrainer(Trainer):
    """Trains an MTP draft head on a frozen policy, before RL.

    The policy is frozen (eval mode, no gradients) and only the head is optimised. Each batch takes one policy
    forward for the hidden states; the head is unrolled `num_mtp_steps` steps along the sequence with teacher
    forcing, and [`mtp_loss`][bebop_trl.ops.fused_mtp_loss.mtp_loss] gives the loss and the per-step acceptance 1 - TV. Evaluation
    adds the acceptance measured with the real [`SpeculativeGenerator`][bebop_trl.SpeculativeGenerator] on held-out
    prompts, in both drafting modes. `save_model` writes the head only, as an adapter repo (`config.json`,
    `model.safetensors`, `README.md`, `training_args.json`; no pickle), and `push_to_hub` uploads just these files;
    checkpoints add the trainer state.

    Args:
        model: The policy: a model or the folder / Hub id of one. Given by name with a self-distilled corpus as
            `train_dataset` and no `eval_dataset`, only its embedding, lm_head, final norm and last layers are
            loaded ([`load_policy_io`][bebop_trl.modeling.policy_io.load_policy_io]).
        args: The training configuration.
        train_dataset: Data in one of the formats of
            [`detect_format`][bebop_trl.trainers.mtp_data.detect_format]; prompt-only data is completed by sampling
            from the policy at `args.temperature` (self-distillation), cached on disk. A corpus of
            [`build_distill_corpus`][bebop_trl.trainers.distill_corpus.build_distill_corpus] brings the policy's
            hidden states: training then never runs the policy.
        eval_dataset: Held-out data in the same formats.
        processing_class: The policy's tokenizer (loaded from `model` when None).
        head: The head to train; by default built as `args.mtp_head`, `args.head_layout`,
            `args.head_aux_layers`, `args.head_num_layers` and `args.draft_vocab_size` say.
        data_collator: Pads batches (default: `DataCollatorWithPadding` of the tokenizer).
        callbacks: Extra `TrainerCallback`s.
        optimizers: An `(optimizer, scheduler)` pair to use instead of AdamW and the configured schedule.

    Example:
        ```python
        from datasets import Dataset
        from bebop_trl import MTPConfig, MTPTrainer

        prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 17 * 3?"}]] * 64})
        trainer = MTPTrainer("HuggingFaceTB/SmolLM2-135M-Instruct", MTPConfig("smollm2-head"), prompts)
        trainer.train()
        trainer.save_model()  # the head, as an adapter repo with its model card
        ```
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: MTPConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        head: MTPHead | None = None,
        data_collator: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = MTPConfig(f"{os.path.basename(str(name).rstrip('/')) or 'policy'}-mtp-head")
        if isinstance(model, str):
            if train_dataset is not None and is_distill_corpus(train_dataset) and eval_dataset is None:
                # The hidden states come with the data and no evaluation runs the engine: of the policy, only what
                # the head shares or copies is loaded.
                model = load_policy_io(model, num_last_layers=args.head_num_layers, device=args.device)
            else:
                model = AutoModelForCausalLM.from_pretrained(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config.name_or_path)
        policy = model.eval().requires_grad_(False)
        self.policy = policy
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_eval_averages: dict[str, float] = {}

        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(v, processing_class, args, k) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")
        # After the data: a draft vocabulary is chosen from the tokenised training set.
        self.head = self._build_head(policy, head, args, train_dataset, processing_class)
        self.head.config.recipe = _recipe(args, self.head, train_dataset)
        if data_collator is None:
            if train_dataset is not None and is_distill_corpus(train_dataset):
                pad = processing_class.pad_token_id
                data_collator = CorpusCollator(
                    pad if pad is not None else processing_class.eos_token_id, max_length=args.max_length
                )
            else:
                data_collator = DataCollatorWithPadding(processing_class)
        super().__init__(
            model=MTPTrainingModule(policy, self.head, args),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )

    @staticmethod
    def _build_head(
        policy: PreTrainedModel,
        head: MTPHead | None,
        args: MTPConfig,
        train_dataset: Dataset | None,
        tokenizer: PreTrainedTokenizerBase,
    ) -> MTPHead:
        if head is not None:
            head = head.bind(policy)
        elif args.mtp_head:
            head = load_head(policy, args.mtp_head).float()
        else:
            draft_vocab = None
            if args.draft_vocab_size is not None:
                draft_vocab = _choose_draft_vocab(policy, train_dataset, tokenizer, args)
            aux = {} if args.head_aux_layers is None else {"aux_layers": list(args.head_aux_layers)}
            head = MTPHead.from_model(
                policy, num_layers=args.head_num_layers, layout=args.head_layout, draft_vocab=draft_vocab, **aux
            )
            # The policy may run in bf16; the head's master weights stay in float32 for the optimizer.
            head = head.float()
        if args.draft_vocab_size is not None and head.config.draft_vocab_size != args.draft_vocab_size:
            raise ValueError(
                f"draft_vocab_size={args.draft_vocab_size} builds a new head, but the head given has draft vocabulary "
                f"size {head.config.draft_vocab_size}. Leave draft_vocab_size unset to train that head as it is."
            )
        return head

    def _prepare_dataset(self, dataset: Dataset | None, tokenizer, args: MTPConfig, name: str) -> Dataset | None:
        if dataset is None:
            return None
        if is_distill_corpus(dataset):
            # The policy's hidden states come with the records: training never runs the policy.
            return prepare_corpus(dataset, self.policy.config.get_text_config().hidden_size)
        if needs_self_distillation(dataset, args.dataset_text_field):
            prompts = prompt_ids_of(dataset, tokenizer, args.dataset_text_field)
            # The main process samples and caches; the others then read its cache.
            with args.main_process_first(desc=f"self-distillation of the {name} prompts"):
                dataset = self_distill(
                    self.policy,
                    tokenizer,
                    prompts,
                    samples_per_prompt=args.distill_samples_per_prompt,
                    max_new_tokens=args.distill_max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.distill_top_p,
                    top_k=args.distill_top_k,
                    batch_size=args.distill_batch_size,
                    seed=args.seed,
                    cache_dir=args.distill_cache_dir,
                )
        return tokenize_dataset(dataset, tokenizer, text_field=args.dataset_text_field, max_length=args.max_length)

    # --------------------------------------------------------------------------------------------------- training

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """One batch's head loss; records the per-step acceptance, TV and expected accepted length.

        Raises:
            FloatingPointError: If the loss is NaN or infinite: the step is not taken, and the error names the
                step and the batch.
        """
        warm_start = model.training and self._in_kl_warm_start()
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            prompt_length=inputs.get(PROMPT_LENGTH),
            loss_type="kl" if warm_start else None,
            hidden_states=inputs.get(HIDDEN_STATES),
            aux_hidden_states=inputs.get(AUX_HIDDEN_STATES),
            policy_log_normalizer=inputs.get(POLICY_LOG_NORMALIZER),
        )
        if not torch.isfinite(out.loss):
            lengths = inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else None
            raise FloatingPointError(
                f"The MTP loss is {out.loss.item()} at global step {self.state.global_step} (epoch "
                f"{self.state.epoch}) on a batch of {inputs['input_ids'].shape[0]} sequences of lengths {lengths}; "
                "the head was not updated with it. Lower the learning rate or check the data, then resume from the "
                "last checkpoint (resume_from_checkpoint=True)."
            )
        mode = "train" if model.training else "eval"
        metrics = self._metrics[mode]
        for step, (acceptance, tv) in enumerate(zip(out.acceptance.tolist(), out.tv.tolist(), strict=True), 1):
            metrics[f"acceptance/step_{step}"].append(acceptance)
            metrics[f"tv/step_{step}"].append(tv)
        metrics["expected_accepted_length"].append(out.expected_accepted_length.item())
        if self.head.draft_vocab is not None:
            # The ceiling of every step's acceptance is one minus this.
            metrics["target_mass_outside_draft_vocab"].append(out.target_mass_outside_draft_vocab.nanmean().item())
        if model.training:
            metrics["kl_warm_start"].append(float(warm_start))
        return (out.loss, out) if return_outputs else out.loss

    def _in_kl_warm_start(self) -> bool:
        """Whether this step trains a TV-family head with `kl` (see `MTPConfig.kl_warm_start`)."""
        if self.args.loss_type not in ("tv", "e2e_tv") or not self.args.kl_warm_start:
            return False
        warm = self.args.kl_warm_start
        steps = int(warm) if warm >= 1 else math.ceil(warm * self.state.max_steps)
        return self.state.global_step < steps

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss of one batch (no logits or labels: the head's logits are never materialised)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Logs `logs` with the per-step acceptance, TV and expected accepted length averaged since the last log.

        The recorded values are gathered from every process before averaging; evaluation metrics get the `eval_`
        prefix.

        Args:
            logs: The metrics `Trainer` logs (loss, learning rate, ...).
            start_time: Start of the run, for the speed metrics of `Trainer`.
        """
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        averaged = {}
        for name, values in self._metrics[mode].items():
            gathered = self.accelerator.gather_for_metrics(torch.tensor(values, device=self.args.device))
            averaged[f"{prefix}{name}"] = gathered.float().mean().item()
        self._metrics[mode].clear()
        if mode == "eval":
            self._last_eval_averages = averaged
        super().log({**logs, **averaged}, start_time)

    # ------------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The loss and analytic acceptance on `eval_dataset`, plus the acceptance measured with the real engine.

        The engine drafts `num_speculative_tokens` tokens from the head on up to `eval_num_prompts` held-out prompts
        at the training temperature, in both drafting modes; the figures also go into the head's model card.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            # transformers evaluates each set by calling this method again, with its name and prefix eval_<name>.
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        self._last_eval_averages = {}
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # The per-step statistics went to the loggers as eval_*; return them under the caller's prefix too.
        metrics.update(
            {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in self._last_eval_averages.items()}
        )
        if dataset is None:
            return metrics
        measured = {f"{metric_key_prefix}_{k}": v for k, v in self.measure_acceptance(dataset).items()}
        self.head.config.metrics = {k.removeprefix(f"{metric_key_prefix}_"): round(v, 4) for k, v in measured.items()}
        self.log(measured)
        return {**metrics, **measured}

    def measure_acceptance(self, dataset: Dataset) -> dict[str, float]:
        """Acceptance of the real engine on the prompts of `dataset`, in both drafting modes.

        A row's prompt is its first `prompt_length` tokens, or its first half where the data has no prompt.
        """
        if any(param.is_meta for param in self.policy.parameters()):
            raise ValueError(
                "This trainer loaded only the policy's embedding, lm_head and last layers (training on a corpus, "
                "with no eval_dataset), so the engine cannot run it. Pass the policy itself as model, or an "
                "eval_dataset when building the trainer, to measure acceptance."
            )
        rows = dataset.select(range(min(self.args.eval_num_prompts, len(dataset))))
        prompts = [
            ids[: length if length > 0 else max(1, len(ids) // 2)]
            for ids, length in zip(rows["input_ids"], rows[PROMPT_LENGTH], strict=True)
        ]
        results = {}
        for mode in DRAFT_SAMPLING_MODES:
            generator = torch.Generator(device=self.policy.device).manual_seed(self.args.seed)
            out = generate_from_ids(
                self.policy,
                self.processing_class,
                prompts,
                head=self.head,
                num_speculative_tokens=self.args.num_speculative_tokens,
                draft_sampling=mode,
                max_new_tokens=self.args.eval_max_new_tokens,
                temperature=self.args.temperature,
                generator=generator,
            )
            stats = out.stats
            results[f"measured_acceptance_{mode}"] = stats.acceptance_rate
            results[f"measured_accepted_length_{mode}"] = stats.accepted_drafts_per_cycle
            for position, rate in enumerate(stats.acceptance_per_position.tolist(), 1):
                results[f"measured_acceptance_{mode}/position_{position}"] = rate
        return results

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the head (an adapter repo with its model card) and the training arguments as JSON.

        Unlike `Trainer._save`, nothing here is a pickle (`training_args.bin`) and the tokenizer is not saved: a head
        is loaded onto its policy and uses the policy's tokenizer. The files written are exactly `HEAD_REPO_FILES`.

        Args:
            output_dir: Folder to write (default: `args.output_dir`).
            state_dict: Ignored: the head saves its own weights, never the frozen policy's.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.head.save_pretrained(output_dir)
        # to_json_string masks the Hub token, so the file can be published with the head.
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string() + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.head.load_head_state_dict(
            load_tensors(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)), source=resume_from_checkpoint
        )
        self.head.float()

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes the head's model card (recipe and measured acceptance) into `output_dir`."""
        if self.is_world_process_zero():
            head_model_card(self.head.config).save(os.path.join(self.args.output_dir, MODEL_CARD_NAME))

    # ------------------------------------------------------------------------------------------------------- Hub

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> CommitInfo | Future | None:
        """Saves the head into `output_dir` and uploads it to `args.hub_model_id`: the head repo files only.

        As `Trainer.push_to_hub` (the repo is created if needed, an ongoing checkpoint push is awaited), except that
        only `config.json`, `model.safetensors`, `README.md` and `training_args.json` are uploaded, whatever else
        `output_dir` holds: `Trainer` uploads the whole folder, where checkpoints, logs, tokenizer files or a
        `training_args.bin` pickle left by other tools would go along.

        Args:
            commit_message: Message of the commit.
            blocking: Return only when the upload has finished; otherwise return a `Future` of it.
            token: Hub token with write access (default: `args.hub_token`).
            revision: Branch to push to (default: `args.hub_revision`).
            private: Create the repo as private (default: `args.hub_private_repo`; ignored if it exists).
            **kwargs: Passed to [`create_model_card`][bebop_trl.MTPTrainer.create_model_card], as in `Trainer`.

        Returns:
            The commit on the Hub, or a `Future` of it when `blocking=False`; None on processes other than the
            main one.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        # Every process takes part in saving (collective gathers under some backends); only the main one uploads.
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        self._finish_current_push()
        return hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            allow_patterns=list(HEAD_REPO_FILES),
            revision=revision if revision is not None else self.args.hub_revision,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Pushes the head of a checkpoint just saved, when `push_to_hub` is set and `hub_strategy` is not "end".

        Replaces `Trainer._push_from_checkpoint`, which re-saves the tokenizer and pickles the training arguments
        (`training_args.bin`) into `output_dir`, then uploads that whole folder. Here the head repo files are copied
        from the checkpoint into `output_dir` and only they are uploaded, in the background as in `Trainer`. With
        `hub_strategy` "checkpoint" or "all_checkpoints" the checkpoint folder itself, with the optimizer, scheduler
        and RNG state that resuming needs, still goes to `last-checkpoint/` or `checkpoint-N/` in the repo, as
        transformers does: a head loaded from the repo reads only its root files.

        Args:
            checkpoint_folder: The `checkpoint-N` folder just written.
        """
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        # As in Trainer: pushes do not pile up behind a slow upload unless `hub_always_push` asks for every one.
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        # The upload runs in the background: from a copy, since checkpoint rotation may delete the folder meanwhile.
        for name in HEAD_REPO_FILES:
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        push_jobs = [
            hf_api().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=output_dir,
                commit_message=commit_message,
                token=self.args.hub_token,
                run_as_future=True,
                allow_patterns=list(HEAD_REPO_FILES),
                revision=self.args.hub_revision,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint"
                if self.args.hub_strategy == HubStrategy.CHECKPOINT
                else os.path.basename(checkpoint_folder)
            )
            push_jobs.append(
                hf_api().upload_folder(
                    repo_id=self.hub_model_id,
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint",
                    token=self.args.hub_token,
                    run_as_future=True,
                    revision=self.args.hub_revision,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(push_jobs)
        else:
            self.push_in_progress.jobs.extend(push_jobs)


def _recipe(args: MTPConfig, head: MTPHead, train_dataset: Dataset | None) -> dict[str, Any]:
    """The training settings recorded in the head's config and model card."""
    recipe = {
        "trainer": "MTPTrainer",
        "loss_type": args.loss_type,
        "num_mtp_steps": args.num_mtp_steps,
        "kl_warm_start": args.kl_warm_start,
        **({"lk_kl_scale": args.lk_kl_scale, "lk_kl_decay": args.lk_kl_decay} if "lambda" in args.loss_type else {}),
        "temperature": args.temperature,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "max_steps": args.max_steps,
        "num_train_epochs": args.num_train_epochs,
    }
    if head.draft_vocab is not None:
        recipe["draft_vocab_size"] = head.config.draft_vocab_size
        if train_dataset is not None:
            sequences = _drafted_tokens(train_dataset, args)
            recipe["draft_vocab_train_mass"] = round(
                draft_vocab_mass(head.draft_vocab, head.config.vocab_size, sequences=sequences), 4
            )
    return recipe


def _drafted_tokens(dataset: Dataset, args: MTPConfig) -> list[list[int]]:
    """The tokens of each row that the head learns to draft: its completion when it has a prompt and the loss is
    completion-only, else all of it."""
    return [
        ids[length:] if args.completion_only_loss and length > 0 else ids
        for ids, length in zip(dataset["input_ids"], dataset[PROMPT_LENGTH], strict=True)
    ]


def _choose_draft_vocab(
    policy: PreTrainedModel, dataset: Dataset | None, tokenizer: PreTrainedTokenizerBase, args: MTPConfig
) -> torch.LongTensor:
    """The `args.draft_vocab_size` tokens that carry the most of the policy's mass on the training data.

    The data are the policy's own samples (or text standing in for them), so token frequencies estimate its mass.
    The tokenizer's special tokens and the policy's EOS ids are always included, so the head can draft a
    completion's end.
    """
    if dataset is None:
        raise ValueError("draft_vocab_size chooses the head's draft vocabulary from train_dataset: pass one.")
    vocab_size = policy.get_output_embeddings().weight.shape[0]
    eos = policy.generation_config.eos_token_id if policy.generation_config is not None else None
    special = {*tokenizer.all_special_ids, *([eos] if isinstance(eos, int) else eos or [])}
    return select_draft_vocab(
        vocab_size,
        sequences=_drafted_tokens(dataset, args),
        size=args.draft_vocab_size,
        always_include=[i for i in special if i is not None and 0 <= i < vocab_size],
    )
