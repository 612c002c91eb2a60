"""The loss study in the paper's protocol, at small scale: copies of one CE-trained head fine-tuned with each loss.

The paper fine-tunes heads that pre-training with CE already made good. Here a CE head trained on the self-distilled
corpus of `build_smollm2_corpus.py` stands in for that native head (`--base-head`; trained by
`train_smollm2_head.py --loss-type ce`). Then, for every loss of `--losses` and seed of `--seeds`:

- `finetune`: a copy of the base head trained `--steps` steps with that loss (batches drawn with that seed);
- `scratch`: a head from the layout's identity initialisation trained the same steps with that loss (the
  equal-budget comparison from scratch).

Neither stage uses a KL warm start unless a `--losses` entry asks for one (`e2e_tv+kl0.2`, or `default` for
`MTPConfig`'s default loss and warm start). Every head is measured with the real engine at
k = 3 on held-out prompts (`--eval-prompts` of the held-out half of `smollm2_task.task_prompt_split`, after the
first 32 that the learning curves use; the corpus excludes the whole half), at each of `--temperatures`, in both
drafting modes: acceptance per position and accepted drafts per cycle. The base head is measured the same way.

Each head is saved under `--work-dir` and each measurement added to `--output` as soon as it is made, so an
interrupted run resumes where it stopped. Workers with disjoint `--seeds` (or `--losses`, `--stages`) may run at once
on the same `--output`: they merge their measurements under a file lock, and the table covers every head measured.
The table (mean and standard deviation over seeds) goes to stdout and to the Markdown file next to `--output`, the
plot of position-1 acceptance per loss next to it, and the heads' training curves (each head keeps its
`log_history.json`) to `<output>_curves.png`.

    nohup .venv/bin/python benchmarks/study_protocol.py --base-head outputs/heads/smollm2-eagle3-ce \\
        > outputs/logs/study-protocol.log 2>&1 &
    # or two workers of one thread each, which train faster on 2 cores than one worker of two threads:
    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/study_protocol.py --base-head ... \\
        --losses ce kl rkl tv e2e_tv > outputs/logs/study-protocol-a.log 2>&1 &
    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/study_protocol.py --base-head ... \\
        --losses lk_alpha lk_lambda e2e_lk_alpha e2e_lk_lambda > outputs/logs/study-protocol-b.log 2>&1 &
"""

import argparse
import glob
import json
import os
import statistics
from itertools import product

import torch
from filelock import FileLock
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from smollm2_task import task_prompt_split

from bebop_trl import MTPConfig, MTPHead, MTPTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.ops import LOSS_TYPES
from bebop_trl.rollout.measure import measure_acceptance
from bebop_trl.trainers.distill_corpus import load_distill_corpus


K = 3
LOG_HISTORY = "log_history.json"
MODES = ("probabilistic", "greedy")
STAGES = ("finetune", "scratch")
# Settings under which stored measurements belong to the same study (seeds, losses and stages may differ per worker).
SAME_STUDY = (
    "base_head",
    "steps",
    "batch_size",
    "finetune_learning_rate",
    "scratch_learning_rate",
    "temperatures",
    "eval_prompts",
    "eval_samples",
    "eval_max_new_tokens",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-head", required=True, help="The CE-trained head the fine-tuning starts from.")
    parser.add_argument("--corpus-dir", default="outputs/corpora/smollm2-basic-arithmetic-t1")
    parser.add_argument(
        "--losses",
        nargs="+",
        type=schedule_name,
        default=list(LOSS_TYPES),
        help="Loss types, each optionally with a KL warm start over a fraction of the steps (`e2e_tv+kl0.2`); "
        "`default` is MTPConfig's default loss and warm start.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps per head.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-4)
    parser.add_argument("--scratch-learning-rate", type=float, default=3e-4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2, help="Completions per prompt.")
    parser.add_argument("--eval-max-new-tokens", type=int, default=96)
    parser.add_argument("--work-dir", default="outputs/study_protocol")
    parser.add_argument("--output", default="benchmarks/results/loss_study.json")
    return parser.parse_args()


def schedule_name(name: str) -> str:
    """Checks a `--losses` entry and spells `default` out as the loss and warm start it stands for today."""
    if name == "default":
        name = (
            f"{MTPConfig.loss_type}+kl{MTPConfig.kl_warm_start:g}" if MTPConfig.kl_warm_start else MTPConfig.loss_type
        )
    loss_type_and_warm_start(name)
    return name


def loss_type_and_warm_start(name: str) -> tuple[str, float]:
    """`"e2e_tv+kl0.2"` -> `("e2e_tv", 0.2)`; a bare loss type has no warm start."""
    loss, _, warm = name.partition("+kl")
    if loss not in LOSS_TYPES:
        raise argparse.ArgumentTypeError(f"unknown loss {loss!r} in {name!r}: use one of {LOSS_TYPES}")
    try:
        return loss, float(warm) if warm else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad warm start in {name!r}: write e.g. {loss}+kl0.2") from None


def train_head(policy, tokenizer, corpus, base: MTPHead, args, stage: str, loss: str, seed: int) -> str:
    """Trains one head of the study (or finds it trained) and returns its folder."""
    folder = os.path.join(args.work_dir, stage, f"{loss}-seed{seed}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    loss_type, warm_start = loss_type_and_warm_start(loss)
    config = MTPConfig(
        output_dir=folder,
        loss_type=loss_type,
        kl_warm_start=warm_start,
        num_mtp_steps=K,
        temperature=1.0,
        learning_rate=args.finetune_learning_rate if stage == "finetune" else args.scratch_learning_rate,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        train_sampling_strategy="group_by_length",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
    )
    if stage == "finetune":
        head = MTPHead.from_pretrained(args.base_head, policy=policy)
    else:
        # The base head's layout and draft vocabulary, from the layout's initialisation: only the training differs.
        aux = {"aux_layers": list(base.aux_layers)} if base.aux_layers else {}
        head = MTPHead.from_model(policy, layout=base.config.layout, draft_vocab=base.draft_vocab, **aux)
    trainer = MTPTrainer(policy, config, corpus, processing_class=tokenizer, head=head)
    trainer.train()
    trainer.save_model()
    # The learning curve (loss, gradient norm, 1 - TV per step on the training batches), for the overlap plots.
    with open(os.path.join(folder, LOG_HISTORY), "w", encoding="utf-8") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    return folder


def measure(policy, tokenizer, head: MTPHead, prompts, args) -> dict:
    """Acceptance per position and accepted drafts per cycle, per temperature and drafting mode."""
    figures = {}
    for temperature, mode in product(args.temperatures, MODES):
        summary = measure_acceptance(
            policy, tokenizer, head, prompts, draft_sampling=mode, num_speculative_tokens=K,
            max_new_tokens=args.eval_max_new_tokens, temperature=temperature, batch_size=16, seed=0,
        )  # fmt: skip
        figures[f"T={temperature:g} {mode}"] = {
            "acceptance_per_position": summary["acceptance_per_position"],
            "accepted_drafts_per_cycle": summary["accepted_drafts_per_cycle"],
            "num_drafts": summary["num_drafts"],
        }
    return figures


def summarise(runs: dict, args) -> list[dict]:
    """Mean and standard deviation over seeds of every (stage, loss, setting)."""
    rows = []
    settings = [f"T={t:g} {m}" for t, m in product(args.temperatures, MODES)]
    # Every head measured so far, whichever worker trained it.
    seeds = sorted({int(key.split("/")[2]) for key in runs})
    # Bare loss types in the library's order, then the warm-started schedules.
    order = {loss: index for index, loss in enumerate(LOSS_TYPES)}
    schedules = sorted({key.split("/")[1] for key in runs}, key=lambda n: (order.get(n, len(order)), n))
    for stage, loss, setting in product(STAGES, schedules, settings):
        measured = [runs[key][setting] for seed in seeds if (key := f"{stage}/{loss}/{seed}") in runs]
        if not measured:
            continue
        positions = [m["acceptance_per_position"] for m in measured]
        first = [p[0] for p in positions]
        drafts = [m["accepted_drafts_per_cycle"] for m in measured]
        rows.append(
            {
                "stage": stage,
                "loss": loss,
                "setting": setting,
                "seeds": len(measured),
                "position_1": statistics.mean(first),
                "position_1_std": statistics.stdev(first) if len(first) > 1 else 0.0,
                "per_position": [statistics.mean(col) for col in zip(*positions, strict=True)],
                "drafts_per_cycle": statistics.mean(drafts),
                "drafts_per_cycle_std": statistics.stdev(drafts) if len(drafts) > 1 else 0.0,
            }
        )
    return rows


def table(rows: list[dict], base: dict) -> str:
    lines = [
        "| stage | loss | setting | seeds | acceptance per position | position 1 | accepted drafts per cycle |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, figures in base.items():
        per_position = " / ".join(f"{a:.3f}" for a in figures["acceptance_per_position"])
        lines.append(
            f"| base | - | {setting} | - | {per_position} | {figures['acceptance_per_position'][0]:.3f} | "
            f"{figures['accepted_drafts_per_cycle']:.3f} |"
        )
    for row in rows:
        per_position = " / ".join(f"{a:.3f}" for a in row["per_position"])
        lines.append(
            f"| {row['stage']} | {row['loss']} | {row['setting']} | {row['seeds']} | {per_position} | "
            f"{row['position_1']:.3f} ± {row['position_1_std']:.3f} | "
            f"{row['drafts_per_cycle']:.3f} ± {row['drafts_per_cycle_std']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Position-1 acceptance per loss (mean ± std over seeds), one panel per stage, T = 1 probabilistic."""
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    stages = sorted({row["stage"] for row in rows})
    for index, stage in enumerate(stages):
        axis = figure.add_subplot(1, len(stages), index + 1)
        shown = [r for r in rows if r["stage"] == stage and r["setting"] == "T=1 probabilistic"]
        axis.bar(
            [r["loss"] for r in shown],
            [r["position_1"] for r in shown],
            yerr=[r["position_1_std"] for r in shown],
            capsize=3,
        )
        axis.set_title(f"{stage}, T = 1, probabilistic")
        axis.set_ylabel("acceptance at position 1")
        axis.tick_params(axis="x", labelrotation=60)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_curves(work_dir: str, path: str) -> None:
    """Per stage, the training curves of the heads that kept theirs: 1 - TV at draft step 1 on the training batches
    (how much draft and target overlap) and the gradient norm, each loss averaged over its seeds."""
    curves: dict[tuple[str, str], list[list[dict]]] = {}
    for file in sorted(glob.glob(os.path.join(work_dir, "*", f"*-seed*/{LOG_HISTORY}"))):
        stage, name = file.split(os.sep)[-3:-1]
        with open(file, encoding="utf-8") as f:
            entries = [e for e in json.load(f) if "acceptance/step_1" in e and "grad_norm" in e]
        curves.setdefault((stage, name.rsplit("-seed", 1)[0]), []).append(entries)
    stages = sorted({stage for stage, _ in curves})
    if not stages:
        return
    figure = Figure(figsize=(11, 3.6 * len(stages)))
    FigureCanvasAgg(figure)
    for row, stage in enumerate(stages):
        for column, (key, label) in enumerate(
            (("acceptance/step_1", "1 - TV, step 1"), ("grad_norm", "gradient norm"))
        ):
            axis = figure.add_subplot(len(stages), 2, 2 * row + column + 1)
            for (curve_stage, loss), runs in curves.items():
                if curve_stage != stage:
                    continue
                steps = [e["step"] for e in runs[0]]
                values = [statistics.mean(run[i][key] for run in runs if i < len(run)) for i in range(len(steps))]
                axis.plot(steps, values, label=f"{loss} ({len(runs)})", linewidth=1)
            axis.set_title(f"{stage}: {label} on the training batches")
            axis.set_xlabel("step")
            if key == "grad_norm":
                axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    policy, tokenizer = load_smollm2()
    corpus = load_distill_corpus(args.corpus_dir)
    _, held_out = task_prompt_split(tokenizer)
    prompts = [p for p in held_out[32 : 32 + args.eval_prompts] for _ in range(args.eval_samples)]
    base = MTPHead.from_pretrained(args.base_head, policy=policy)

    results = {"settings": vars(args), "base": None, "runs": {}}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    lock = FileLock(args.output + ".lock")

    def merge_stored() -> None:
        """Adds what other workers (or an earlier run) stored for the same base head and budget."""
        if not os.path.exists(args.output):
            return
        with open(args.output, encoding="utf-8") as f:
            stored = json.load(f)
        same = all(stored["settings"][name] == getattr(args, name) for name in SAME_STUDY)
        if same:
            results["base"] = results["base"] or stored["base"]
            results["runs"] = {**stored["runs"], **results["runs"]}

    def save() -> None:
        with lock:
            merge_stored()
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)

    with lock:
        merge_stored()
    if results["base"] is None:
        results["base"] = measure(policy, tokenizer, base, prompts, args)
        save()
    # Seed by seed: an interrupted study has every loss at its first seeds rather than some losses at all seeds.
    for stage, seed, loss in product(args.stages, args.seeds, args.losses):
        key = f"{stage}/{loss}/{seed}"
        with lock:
            merge_stored()
        if key in results["runs"]:
            continue
        folder = train_head(policy, tokenizer, corpus, base, args, stage, loss, seed)
        head = MTPHead.from_pretrained(folder, policy=policy)
        results["runs"][key] = measure(policy, tokenizer, head, prompts, args)
        save()
        print(f"{key}: {json.dumps(results['runs'][key])}", flush=True)

    rows = summarise(results["runs"], args)
    results["summary"] = rows
    save()
    text = table(rows, results["base"])
    print(text)
    stem = os.path.splitext(args.output)[0]
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot(rows, stem + ".png")
    plot_curves(args.work_dir, stem + "_curves.png")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
