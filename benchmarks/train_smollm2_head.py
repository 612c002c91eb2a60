"""Trains a SmolLM2 head on the self-distilled corpus and records its held-out learning curve (a long, resumable job).

The head trains on the corpus of `build_smollm2_corpus.py` (the training half of the quickstart task's distinct
prompts, sampled at T = 1) from the policy's stored hidden states, so training never runs the policy. Every
`--eval-steps` steps it is evaluated on the held-out half of the prompts, which the corpus excludes:

- the acceptance of the real engine at k = 3, T = 1, in both drafting modes, on `--eval-prompts` prompts;
- the teacher-forced acceptance 1 - TV per draft step on the policy's own completions of them.

The curve (acceptance against training tokens, real tokens only) goes to `--curve` after every evaluation.
Rerunning the same command resumes from the last checkpoint in `--output-dir`; the learning rate is constant (after
a short warm-up), so rerunning with a larger `--epochs` extends a finished run as if it had been asked for from the
start. The head drafts from the `--draft-vocab-size` tokens that carry most of the corpus's completions.

    nohup .venv/bin/python benchmarks/train_smollm2_head.py --layout eagle3 > outputs/logs/head-eagle3.log 2>&1 &
"""

import argparse
import json
import os
import time

import torch
from datasets import Dataset
from smollm2_task import policy_samples, task_prompt_split
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from bebop_trl import MTPConfig, MTPTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.trainers.distill_corpus import load_distill_corpus


class LearningCurve(TrainerCallback):
    """Writes every evaluation (its teacher-forced and its measured figures, logged separately) with the real tokens
    trained on so far to a JSON file; points of a resumed run replace those past its checkpoint."""

    def __init__(self, path: str, settings: dict):
        self.path, self.settings = path, settings
        self.started = time.perf_counter()
        self.points: list[dict] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        evaluated = {k.removeprefix("eval_"): v for k, v in (logs or {}).items() if k.startswith("eval_")}
        if not evaluated or not state.is_world_process_zero:
            return
        if self.points is None:
            self.points = []
            if os.path.exists(self.path):
                with open(self.path, encoding="utf-8") as f:
                    self.points = [p for p in json.load(f)["points"] if p["step"] < state.global_step]
        if not self.points or self.points[-1]["step"] != state.global_step:
            self.points.append({"step": state.global_step, "tokens": int(state.num_input_tokens_seen)})
        self.points[-1].update(evaluated, seconds_this_run=time.perf_counter() - self.started)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"settings": self.settings, "points": self.points}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", default="outputs/corpora/smollm2-basic-arithmetic-t1")
    parser.add_argument("--layout", choices=("eagle", "eagle3"), default="eagle3")
    parser.add_argument("--draft-vocab-size", type=int, default=1024)
    parser.add_argument("--loss-type", default="kl")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--eval-steps", type=int, default=200)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    parser.add_argument("--output-dir", default=None, help="Default: outputs/heads/smollm2-<layout>.")
    parser.add_argument("--curve", default=None, help="Default: benchmarks/results/head_curve_<layout>.json.")
    args = parser.parse_args()
    output_dir = args.output_dir or f"outputs/heads/smollm2-{args.layout}"
    curve = args.curve or f"benchmarks/results/head_curve_{args.layout}.json"

    policy, tokenizer = load_smollm2()
    corpus = load_distill_corpus(args.corpus_dir)
    _, held_out = task_prompt_split(tokenizer)
    held_out = held_out[: args.eval_prompts]
    completions = policy_samples(policy, tokenizer, held_out)
    eval_dataset = Dataset.from_dict(
        {
            "input_ids": [p + c for p, c in zip(held_out, completions, strict=True)],
            "prompt_length": list(map(len, held_out)),
        }
    )
    config = MTPConfig(
        output_dir=output_dir,
        head_layout=args.layout,
        draft_vocab_size=args.draft_vocab_size,
        loss_type=args.loss_type,
        num_mtp_steps=3,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=50,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_length=args.max_length,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        eval_on_start=True,
        eval_num_prompts=args.eval_prompts,
        eval_max_new_tokens=args.eval_max_new_tokens,
        num_speculative_tokens=3,
        save_strategy="steps",
        save_steps=args.eval_steps,
        save_total_limit=2,
        logging_steps=20,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    settings = {
        "command": "python benchmarks/train_smollm2_head.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "corpus_records": len(corpus),
        "eval_prompts": len(held_out),
        "threads": torch.get_num_threads(),
    }
    trainer = MTPTrainer(
        policy, config, corpus, eval_dataset, processing_class=tokenizer, callbacks=[LearningCurve(curve, settings)]
    )
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()


if __name__ == "__main__":
    main()
