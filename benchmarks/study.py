"""Small-scale study of the head losses and drafting modes on SmolLM2-135M-Instruct (reasoning-gym prompts).

Three parts, all with k drafted tokens on the same held-out prompts (seed `--seed + 1`; training uses `--seed`):

(a) Loss ablation. One head per loss (`ce`, `kl`, `rkl`, `tv`, `e2e_tv`, and `kl->e2e_tv`, which spends its first
    `--kl-warm-start-steps` steps on `kl`), trained as `study_mtp_losses.py` trains them: same initialisation, data,
    steps and learning rate. From `MTPTrainer.evaluate()` at the training temperature: the analytic acceptance 1 - TV
    per draft step and expected accepted length on held-out self-distilled completions, and the acceptance of the real
    engine per draft position in both drafting modes.
(b) Drafting modes against temperature. The `ce` and `e2e_tv` heads draft probabilistically and greedily at each of
    `--temperatures` (policy and draft at the same temperature).
(c) Acceptance against entropy. One point per completion of (b), pooled over the temperatures: the policy's mean
    entropy over the completion and the completion's acceptance rate, weighted by its drafted tokens. Weighted
    least-squares slopes with 95% bootstrap intervals (completions resampled jointly for all four head and mode
    pairs), set against the paper's -1.68 (CE head, greedy) and -0.06 (TV head, probabilistic).

Heads found in `--heads-dir` (one folder per head, as `study_mtp_losses.py --save-heads` writes them) are loaded;
missing ones are trained with the settings below, the defaults being the budget of the recorded loss ablation, and
saved there. Writes study.md, study.json and study_*.png to `--output-dir`.

Full study (target: under 40 minutes on 2 idle CPU cores when only `rkl` must be trained):

    python benchmarks/study.py --heads-dir /tmp/study/heads

Smoke run (on a copy of a full run's heads folder, so that only `rkl` is trained, for 2 steps):

    python benchmarks/study.py --heads-dir /tmp/study-smoke-heads --output-dir /tmp/study-smoke \\
        --max-steps 2 --eval-prompts 2 --eval-max-new-tokens 16 --temperatures 1.0
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from study_mtp_losses import study_config
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bebop_trl import MTPHead, MTPTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.rollout.torch_engine import generate_from_ids
from bebop_trl.speculative import DRAFT_SAMPLING_MODES
from bebop_trl.tasks import reasoning_gym_dataset
from bebop_trl.trainers.acceptance_fit import AcceptanceEntropyFit
from bebop_trl.trainers.mtp_data import prompt_ids_of


LOSSES = ("ce", "kl", "rkl", "tv", "e2e_tv")
WARM_START_HEAD = "kl->e2e_tv"
SWEEP_HEADS = ("ce", "e2e_tv")
# The paper's figures (Qwen3.5-35B-A3B, k = 3): acceptance of CE heads under rejection sampling, gain of each loss
# over CE in percentage points, and slopes of acceptance against entropy (nats) per (head, drafting mode).
PAPER_CE_ACCEPTANCE = (0.65, 0.90)
PAPER_GAIN_OVER_CE = {"tv": (1.4, 5.2), "e2e_tv": (2.3, 8.0)}
PAPER_KL_GAIN = 0.0
STEEP, FLAT = ("ce", "greedy"), ("e2e_tv", "probabilistic")
PAPER_SLOPES = {STEEP: -1.68, FLAT: -0.06}
# The paper calls KL's gain "about 0"; a gain within this many points is read as such here.
ABOUT_ZERO_POINTS = 1.0
NUM_BINS = 8
BOOTSTRAP_SAMPLES = 1000
# Below this many completions per (head, mode) a bootstrap interval says nothing (two points fit a line exactly).
MIN_COMPLETIONS_FOR_INTERVAL = 10

Combo = tuple[str, str]  # (head, drafting mode)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--heads-dir", default="outputs/study/heads", help="heads to load; missing ones are saved here"
    )
    parser.add_argument("--output-dir", default="benchmarks/results", help="where study.md/.json/_*.png go")
    parser.add_argument("--task", default="basic_arithmetic", help="reasoning-gym task of the prompts")
    # Training; the names and meanings are those of study_mtp_losses.py, whose `study_config` builds the config.
    parser.add_argument("--num-prompts", type=int, default=256, help="training prompts (self-distilled once)")
    parser.add_argument("--distill-max-new-tokens", type=int, default=96)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--num-mtp-steps", type=int, default=3)
    parser.add_argument("--kl-warm-start-steps", type=int, default=30, help="kl steps of kl->e2e_tv (0: no such head)")
    parser.add_argument("--temperature", type=float, default=1.0, help="training temperature; (a) evaluates at it")
    parser.add_argument("--seed", type=int, default=0)
    # Evaluation.
    parser.add_argument("--k", type=int, default=3, help="drafted tokens per cycle")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts, the same for every head")
    parser.add_argument("--eval-max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.3], help="temperatures of (b) and (c)"
    )
    args = parser.parse_args()
    if args.eval_prompts < 1 or args.eval_max_new_tokens < 1:
        parser.error("--eval-prompts and --eval-max-new-tokens must be >= 1")
    if min(args.temperatures) <= 0:
        parser.error("--temperatures must be > 0")
    args.temperatures = sorted(set(args.temperatures))
    return args


@dataclass
class Setup:
    """The frozen policy, its tokenizer and the prompts every head is trained and evaluated on."""

    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_prompts: Dataset
    eval_prompts: Dataset

    @property
    def eval_prompt_ids(self) -> list[list[int]]:
        return prompt_ids_of(self.eval_prompts, self.tokenizer)


class Timings:
    """Wall-clock seconds of the study's stages, printed as each one ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        tqdm.write(f"[time] {name}: {self.seconds[name]:.1f} s")


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    timings = Timings()
    with timings("load policy and prompts"):
        setup = Setup(
            *load_smollm2(),
            train_prompts=reasoning_gym_dataset(args.task, args.num_prompts, seed=args.seed),
            eval_prompts=reasoning_gym_dataset(args.task, args.eval_prompts, seed=args.seed + 1),
        )
    heads, provenance, ablation = {}, {}, {}
    for name, phases in tqdm(head_runs(args), desc="heads", unit="head"):
        heads[name], provenance[name], ablation[name] = prepare_and_evaluate(name, phases, setup, args, timings)

    prompts = setup.eval_prompt_ids
    runs = []
    for head_name, temperature, mode in tqdm(
        list(product(SWEEP_HEADS, args.temperatures, DRAFT_SAMPLING_MODES)), desc="temperature sweep", unit="run"
    ):
        with timings(f"engine {head_name} {mode} T={temperature}"):
            runs.append(measure(setup, heads[head_name], prompts, head_name, mode, temperature, args))
    with timings("fits and bootstrap"):
        entropy_study = acceptance_against_entropy(runs, args.seed)
    timings.seconds["total"] = round(time.perf_counter() - started, 1)

    results = {
        "command": command_line(),
        "settings": vars(args),
        "heads": provenance,
        "ablation": ablation,
        "sweep": runs,
        "entropy": entropy_study,
        "timings_seconds": timings.seconds,
    }
    write_outputs(results, args)


def head_runs(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, int]]]]:
    """Each head's name and training phases (loss, steps), as in study_mtp_losses.py."""
    runs = [(loss_type, [(loss_type, args.max_steps)]) for loss_type in LOSSES]
    if args.kl_warm_start_steps:
        warm = args.kl_warm_start_steps
        runs.append((WARM_START_HEAD, [("kl", warm), ("e2e_tv", args.max_steps - warm)]))
    return runs


def prepare_and_evaluate(
    name: str, phases: list[tuple[str, int]], setup: Setup, args: argparse.Namespace, timings: Timings
) -> tuple[MTPHead, dict[str, Any], dict[str, float]]:
    """Loads the head from `--heads-dir` or trains and saves it there; returns it, its provenance and `evaluate()`."""
    path = os.path.join(args.heads_dir, name.replace(">", ""))
    trained = not os.path.isfile(os.path.join(path, "config.json"))
    if trained:
        if phases[-1][1] < 1:
            raise SystemExit(f"Cannot train {name}: --kl-warm-start-steps must be below --max-steps.")
        with timings(f"train {name}"):
            trainer = train_head(setup, phases, args)
        recipe = dict(trainer.head.config.recipe)
    else:
        # Timed apart: the first eval-only trainer self-distils the held-out prompts (cached for the next ones).
        with timings(f"load {name}"):
            head = MTPHead.from_pretrained(path, policy=setup.policy, dtype=setup.policy.dtype)
            # The eval-only trainer records its own settings as the recipe, so the saved one is read first. It
            # evaluates with the head's last training loss, as the trainer that trained it did.
            recipe = dict(head.config.recipe or {})
            config = study_config(args, phases[-1][0], args.max_steps, data_seed=args.seed)
            trainer = MTPTrainer(
                setup.policy, config, None, setup.eval_prompts, processing_class=setup.tokenizer, head=head
            )
    with timings(f"evaluate {name}"):
        metrics = trainer.evaluate()
    if trained:
        trainer.save_model(path)  # after evaluate(), so that the model card carries the measured acceptance
    provenance = {
        "path": path,
        "source": "trained" if trained else "loaded",
        "recipe": recipe,
        "differs_from_settings": recipe_mismatches(recipe, phases, args),
        "train_seconds": timings.seconds.get(f"train {name}"),
    }
    return trainer.head, provenance, metrics


def train_head(setup: Setup, phases: list[tuple[str, int]], args: argparse.Namespace) -> MTPTrainer:
    """Trains one head phase by phase exactly as study_mtp_losses.py does; returns the last phase's trainer."""
    trainer, head = None, None
    for phase, (loss_type, max_steps) in enumerate(phases):
        trainer = MTPTrainer(
            setup.policy,
            # The same self-distilled data (keyed by `seed`); a later phase draws its batches in a new order.
            study_config(args, loss_type, max_steps, data_seed=args.seed + phase),
            setup.train_prompts,
            setup.eval_prompts,
            processing_class=setup.tokenizer,
            head=head,
        )
        trainer.train()
        head = trainer.head
    return trainer


def recipe_mismatches(recipe: dict[str, Any], phases: list[tuple[str, int]], args: argparse.Namespace) -> list[str]:
    """The recorded training settings of a head that differ from this run's (its last phase, for kl->e2e_tv)."""
    expected = {
        "loss_type": phases[-1][0],
        "max_steps": phases[-1][1],
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.batch_size,
        "num_mtp_steps": args.num_mtp_steps,
        "temperature": args.temperature,
    }
    return [f"{key} {recipe.get(key)} (run: {value})" for key, value in expected.items() if recipe.get(key) != value]


def measure(
    setup: Setup,
    head: MTPHead,
    prompts: list[list[int]],
    head_name: str,
    mode: str,
    temperature: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One engine run over all prompts, with the aggregate and per-completion acceptance statistics.

    The generator is seeded as in `MTPTrainer.measure_acceptance`, so a run at the training temperature repeats the
    measurement of `evaluate()`.
    """
    out = generate_from_ids(
        setup.policy,
        setup.tokenizer,
        prompts,
        head=head,
        num_speculative_tokens=args.k,
        draft_sampling=mode,
        max_new_tokens=args.eval_max_new_tokens,
        temperature=temperature,
        generator=torch.Generator(device=setup.policy.device).manual_seed(args.seed),
    )
    stats = out.stats
    return {
        "head": head_name,
        "mode": mode,
        "temperature": temperature,
        "acceptance": stats.acceptance_rate,
        "acceptance_per_position": stats.acceptance_per_position.tolist(),
        "accepted_drafts_per_cycle": stats.accepted_drafts_per_cycle,
        "mean_entropy": stats.mean_entropy,
        "num_drafts": stats.num_drafts,
        "generated_tokens": int(out.completion_lengths.sum()),
        "completions": {
            "entropy": stats.mean_entropy_per_row.tolist(),
            # NaN (a completion that ended before drafting) becomes null in JSON.
            "acceptance": [None if math.isnan(a) else a for a in stats.row_acceptance_rate.tolist()],
            "drafted_tokens": stats.draft_tokens_per_row.tolist(),
        },
    }


# ------------------------------------------------------------------------------------------ acceptance vs entropy


def acceptance_against_entropy(runs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Weighted fits, bootstrap intervals and entropy bins of the per-completion points of every (head, mode)."""
    points = {combo: combo_points(runs, combo) for combo in product(SWEEP_HEADS, DRAFT_SAMPLING_MODES)}
    size = len(next(iter(points.values()))[0])
    slopes = bootstrap_slopes(points, size, seed) if size >= MIN_COMPLETIONS_FOR_INTERVAL else None
    all_entropy = np.concatenate([x for x, _, _ in points.values()])
    edges = np.linspace(all_entropy.min(), all_entropy.max(), NUM_BINS + 1)
    combos = {}
    for combo, (x, y, w) in points.items():
        combos[combo_key(combo)] = {
            "fit": fit_line(x, y, w),
            "slope_ci95": interval(slopes[combo]) if slopes else None,
            "paper_slope": PAPER_SLOPES.get(combo),
            "bins": binned_acceptance(x, y, w, edges),
        }
    steep, flat = combos[combo_key(STEEP)]["fit"], combos[combo_key(FLAT)]["fit"]
    return {
        "bin_edges": edges.tolist(),
        "combos": combos,
        "paper_pair_difference": {
            "difference": steep["slope"] - flat["slope"] if steep and flat else None,
            "ci95": interval(slopes[STEEP] - slopes[FLAT]) if slopes else None,
            "paper": PAPER_SLOPES[STEEP] - PAPER_SLOPES[FLAT],
        },
    }


def combo_key(combo: Combo) -> str:
    return f"{combo[0]}/{combo[1]}"


def combo_points(runs: list[dict[str, Any]], combo: Combo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entropy, acceptance (NaN where nothing was drafted) and drafted tokens of each completion of `combo`.

    Runs are taken in temperature order and every run has the same prompts in the same order, so point i of every
    combination comes from the same prompt and temperature: the bootstrap resamples them jointly.
    """
    selected = sorted((r for r in runs if (r["head"], r["mode"]) == combo), key=lambda r: r["temperature"])
    columns = [
        np.array([v if v is not None else np.nan for r in selected for v in r["completions"][field]], dtype=float)
        for field in ("entropy", "acceptance", "drafted_tokens")
    ]
    return columns[0], columns[1], columns[2]


def fit_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float] | None:
    """Weighted least-squares line acceptance = slope * entropy + intercept (None if undefined)."""
    fit = AcceptanceEntropyFit(max_points=1)
    fit.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w))
    return fit.result()


def bootstrap_slopes(
    points: dict[Combo, tuple[np.ndarray, np.ndarray, np.ndarray]], size: int, seed: int
) -> dict[Combo, np.ndarray]:
    """Slopes of every combination over resamplings of its `size` completions, the same indices for all."""
    rng = np.random.default_rng(seed)
    slopes = {combo: np.full(BOOTSTRAP_SAMPLES, np.nan) for combo in points}
    for sample in range(BOOTSTRAP_SAMPLES):
        index = rng.integers(0, size, size)
        for combo, (x, y, w) in points.items():
            fit = fit_line(x[index], y[index], w[index])
            if fit is not None:
                slopes[combo][sample] = fit["slope"]
    return slopes


def interval(values: np.ndarray) -> list[float] | None:
    """Central 95% interval of the finite values (None if there are none)."""
    finite = values[np.isfinite(values)]
    return np.percentile(finite, [2.5, 97.5]).tolist() if finite.size else None


def binned_acceptance(x: np.ndarray, y: np.ndarray, w: np.ndarray, edges: np.ndarray) -> list[dict[str, Any]]:
    """Per entropy bin: accepted / drafted tokens over the completions in it (their weighted mean acceptance)."""
    valid = np.isfinite(y) & (w > 0)
    x, y, w = x[valid], y[valid], w[valid]
    index = np.clip(np.digitize(x, edges[1:-1]), 0, len(edges) - 2)
    bins = []
    for b in range(len(edges) - 1):
        inside = index == b
        weight = w[inside].sum()
        bins.append(
            {
                "entropy": float(np.average(x[inside], weights=w[inside])) if weight else None,
                "acceptance": float((w[inside] * y[inside]).sum() / weight) if weight else None,
                "completions": int(inside.sum()),
            }
        )
    return bins


# ------------------------------------------------------------------------------------------------------ report


def command_line() -> str:
    return "python benchmarks/study.py " + shlex.join(sys.argv[1:])


def write_outputs(results: dict[str, Any], args: argparse.Namespace) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    plots = {
        "losses": plot_ablation(results, os.path.join(args.output_dir, "study_losses.png")),
        "temperature": plot_sweep(results, os.path.join(args.output_dir, "study_temperature.png")),
        "entropy": plot_entropy(results, os.path.join(args.output_dir, "study_acceptance_entropy.png")),
    }
    sections = report_sections(results, args)
    print("\n\n".join(sections))
    markdown = [f"# Small-scale study on SmolLM2-135M-Instruct ({args.task})", *sections]
    markdown += [f"![{name}]({os.path.basename(path)})" for name, path in plots.items()]
    paths = {"md": os.path.join(args.output_dir, "study.md"), "json": os.path.join(args.output_dir, "study.json")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n\n".join(markdown) + "\n")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {paths['md']}, {paths['json']} and {', '.join(plots.values())}")


def report_sections(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    return [
        f"```bash\n{results['command']}\n```",
        paper_section(results),
        settings_section(results, args),
        ablation_section(results, args.k),
        sweep_section(results, args),
        entropy_section(results),
    ]


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_interval(bounds: list[float] | None) -> str:
    return "n/a" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def measured(metrics: dict[str, float], mode: str, position: int | None = None) -> float:
    suffix = "" if position is None else f"/position_{position}"
    return metrics[f"eval_measured_acceptance_{mode}{suffix}"]


def gain_over_ce(results: dict[str, Any], name: str) -> float:
    """Percentage points of measured probabilistic acceptance above the ce head."""
    ablation = results["ablation"]
    return 100 * (measured(ablation[name], "probabilistic") - measured(ablation["ce"], "probabilistic"))


def gain_verdict(name: str, gain: float) -> str:
    if name == "kl":
        if abs(gain - PAPER_KL_GAIN) <= ABOUT_ZERO_POINTS:
            return f"about 0 (within {ABOUT_ZERO_POINTS:g} point), as in the paper"
        return f"contradicts the paper (about 0): more than {ABOUT_ZERO_POINTS:g} point away"
    if name not in PAPER_GAIN_OVER_CE:
        return "no figure in the paper"
    low, high = PAPER_GAIN_OVER_CE[name]
    if gain < 0:
        return f"contradicts the paper: below ce, where the paper finds +{low} to +{high}"
    if gain < low:
        return "above ce as in the paper, but below its range"
    return "within the paper's range" if gain <= high else "above ce as in the paper, and above its range"


def paper_section(results: dict[str, Any]) -> str:
    ce = measured(results["ablation"]["ce"], "probabilistic")
    low, high = PAPER_CE_ACCEPTANCE
    level = "below" if ce < low else "within" if ce <= high else "above"
    lines = [
        "## Against the paper",
        "",
        f"- Acceptance level: the ce head accepts {100 * ce:.1f}% of its drafts drafting probabilistically (k and "
        f"temperature as in (a)); the paper's CE heads accept {100 * low:.0f}-{100 * high:.0f}%: {level} the "
        "paper's range.",
    ]
    for name in ("tv", "e2e_tv", "kl"):
        gain = gain_over_ce(results, name)
        lines.append(f"- {name} - ce: {gain:+.1f} points of probabilistic acceptance: {gain_verdict(name, gain)}.")
    lines += [f"- {line}" for line in slope_verdicts(results["entropy"])]
    lines.append(
        "- (a) is one run per head without error bars; the slopes of (c) carry 95% bootstrap intervals over "
        f"completions when every head and mode has at least {MIN_COMPLETIONS_FOR_INTERVAL} of them."
    )
    return "\n".join(lines)


def slope_verdicts(entropy_study: dict[str, Any]) -> list[str]:
    lines = []
    for combo, paper in PAPER_SLOPES.items():
        entry = entropy_study["combos"][combo_key(combo)]
        slope = entry["fit"]["slope"] if entry["fit"] else None
        ci = entry["slope_ci95"]
        if ci is None:
            comparison = f"no interval to set the paper's {paper} against"
        else:
            comparison = f"the paper's {paper} is {'inside' if ci[0] <= paper <= ci[1] else 'outside'} it"
        lines.append(
            f"Slope of acceptance against entropy, {combo[0]} head, {combo[1]} drafting: {fmt(slope)} per nat "
            f"(95% interval {fmt_interval(ci)}); {comparison}."
        )
    pair = entropy_study["paper_pair_difference"]
    ci = pair["ci95"]
    if ci is None:
        verdict = f"not resolved (no interval below {MIN_COMPLETIONS_FOR_INTERVAL} completions per combination)"
    elif ci[1] < 0:
        verdict = "as in the paper, ce with greedy drafting falls more steeply"
    elif ci[0] > 0:
        verdict = "contradicts the paper: e2e_tv with probabilistic drafting falls more steeply"
    else:
        verdict = "not resolved: the interval includes 0"
    lines.append(
        f"Difference of the two slopes (ce greedy - e2e_tv probabilistic): {fmt(pair['difference'])} "
        f"(95% interval {fmt_interval(ci)}; paper {pair['paper']:.2f}): {verdict}."
    )
    return lines


def settings_section(results: dict[str, Any], args: argparse.Namespace) -> str:
    settings = [
        ["policy", "SmolLM2-135M-Instruct (float32, CPU)"],
        [
            "prompts",
            f"reasoning-gym `{args.task}`: {args.num_prompts} for training (seed {args.seed}), "
            f"{args.eval_prompts} held out (seed {args.seed + 1}) for every evaluation",
        ],
        [
            "training of missing heads",
            f"{args.max_steps} steps of {args.batch_size} self-distilled sequences "
            f"(T = {args.temperature}, up to {args.distill_max_new_tokens} tokens), learning rate {args.learning_rate}, "
            f"{args.num_mtp_steps} unrolled steps; kl->e2e_tv: first {args.kl_warm_start_steps} steps on kl",
        ],
        ["engine", f"k = {args.k}, {args.eval_max_new_tokens} new tokens per prompt, seed {args.seed}"],
        ["(a)", f"`MTPTrainer.evaluate()` at T = {args.temperature}"],
        ["(b), (c)", f"heads {', '.join(SWEEP_HEADS)}; T in {', '.join(f'{t:g}' for t in args.temperatures)}"],
        ["(c)", f"{BOOTSTRAP_SAMPLES} bootstrap resamplings, {NUM_BINS} entropy bins of equal width"],
        ["torch threads", str(torch.get_num_threads())],
    ]
    heads = [
        [
            name,
            info["source"],
            info["path"],
            format_recipe(info["recipe"]),
            "; ".join(info["differs_from_settings"]) or "none",
            fmt(info["train_seconds"], 0),
        ]
        for name, info in results["heads"].items()
    ]
    timings = [[name, f"{seconds:.1f}"] for name, seconds in results["timings_seconds"].items()]
    return "\n\n".join(
        [
            "## Settings",
            table(["setting", "value"], settings),
            table(["head", "source", "folder", "recorded recipe", "differs from these settings", "train s"], heads),
            "Timings (wall clock):",
            table(["stage", "seconds"], timings),
        ]
    )


def format_recipe(recipe: dict[str, Any]) -> str:
    keys = ("loss_type", "max_steps", "per_device_train_batch_size", "learning_rate", "num_mtp_steps", "temperature")
    return ", ".join(f"{key} {recipe.get(key)}" for key in keys)


def ablation_section(results: dict[str, Any], k: int) -> str:
    positions = list(range(1, k + 1))
    rows = []
    for name, m in results["ablation"].items():
        analytic = " / ".join(fmt(m[f"eval_acceptance/step_{j}"]) for j in positions)
        per_mode = [
            " / ".join([fmt(measured(m, mode)), *(fmt(measured(m, mode, j)) for j in positions)])
            for mode in DRAFT_SAMPLING_MODES
        ]
        gain = "-" if name == "ce" else f"{gain_over_ce(results, name):+.1f}"
        verdict = "-" if name == "ce" else gain_verdict(name, gain_over_ce(results, name))
        rows.append([name, analytic, fmt(m["eval_expected_accepted_length"]), *per_mode, gain, verdict])
    header = [
        "head",
        "analytic 1 - TV, step " + " / ".join(map(str, positions)),
        "analytic expected length",
        *(f"measured {mode}: all / pos. " + " / ".join(map(str, positions)) for mode in DRAFT_SAMPLING_MODES),
        "probabilistic - ce (points)",
        "against the paper",
    ]
    return "\n\n".join(
        [
            "## (a) Loss ablation",
            table(header, rows),
            '"all" is accepted / drafted tokens; measured position j is the fraction of draft cycles whose first j '
            "drafts were all accepted.",
        ]
    )


def sweep_section(results: dict[str, Any], args: argparse.Namespace) -> str:
    runs = {(r["head"], r["mode"], r["temperature"]): r for r in results["sweep"]}
    header = ["T", "mean policy entropy (nats)"]
    for head in SWEEP_HEADS:
        header += [f"{head} probabilistic", f"{head} greedy", f"{head} probabilistic - greedy"]
    rows = []
    for t in args.temperatures:
        entropies = [runs[(h, m, t)]["mean_entropy"] for h in SWEEP_HEADS for m in DRAFT_SAMPLING_MODES]
        row = [f"{t:g}", fmt(float(np.mean(entropies)))]
        for head in SWEEP_HEADS:
            prob, greedy = (runs[(head, m, t)]["acceptance"] for m in ("probabilistic", "greedy"))
            row += [fmt(prob), fmt(greedy), f"{prob - greedy:+.3f}"]
        rows.append(row)
    lines = []
    for head in SWEEP_HEADS:
        ahead = sum(
            runs[(head, "probabilistic", t)]["acceptance"] > runs[(head, "greedy", t)]["acceptance"]
            for t in args.temperatures
        )
        lines.append(
            f"- {head}: probabilistic drafting accepts more than greedy at {ahead} of "
            f"{len(args.temperatures)} temperatures."
        )
    lines.append(f"- {reproduction_note(results, args)}")
    return "\n\n".join(
        [
            "## (b) Drafting mode against temperature",
            table(header, rows),
            "Acceptance is accepted / drafted tokens over all prompts; the entropy column averages the four runs' "
            "mean entropy of the policy's distribution at that temperature.",
            "\n".join(lines),
        ]
    )


def reproduction_note(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Whether the sweep's runs at the training temperature equal the measurement of `evaluate()` in (a)."""
    same = [
        r["acceptance"] == measured(results["ablation"][r["head"]], r["mode"])
        for r in results["sweep"]
        if r["temperature"] == args.temperature
    ]
    if not same:
        return f"No sweep temperature equals the training temperature {args.temperature:g}."
    return (
        f"At T = {args.temperature:g} the sweep repeats the measurement of (a) with the same prompts and seed: "
        f"the acceptance is identical in {sum(same)} of {len(same)} runs."
    )


def entropy_section(results: dict[str, Any]) -> str:
    study = results["entropy"]
    rows = []
    for key, entry in study["combos"].items():
        fit = entry["fit"] or {}
        paper = entry["paper_slope"]
        rows.append(
            [
                key,
                fmt(fit.get("slope")),
                fmt_interval(entry["slope_ci95"]),
                fmt(fit.get("intercept")),
                fmt(fit.get("r")),
                fit.get("num_points", 0),
                "-" if paper is None else paper,
            ]
        )
    edges = study["bin_edges"]
    bin_rows = [
        [
            f"{edges[b]:.2f}-{edges[b + 1]:.2f}",
            *(
                f"{fmt(entry['bins'][b]['acceptance'])} ({entry['bins'][b]['completions']})"
                for entry in study["combos"].values()
            ),
        ]
        for b in range(len(edges) - 1)
    ]
    return "\n\n".join(
        [
            "## (c) Acceptance against entropy",
            "One point per completion of (b), pooled over the temperatures: x = the policy's mean entropy over the "
            "completion's tokens, y = its accepted / drafted tokens, weight = its drafted tokens.",
            table(
                ["head/mode", "slope per nat", "95% interval", "intercept", "weighted r", "completions", "paper"], rows
            ),
            "\n".join(f"- {line}" for line in slope_verdicts(study)),
            "Accepted / drafted tokens per entropy bin (completions in the bin):",
            table(["entropy (nats)", *study["combos"]], bin_rows),
        ]
    )


# ------------------------------------------------------------------------------------------------------- plots


def new_axes(width: float = 7, height: float = 4.5) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_ablation(results: dict[str, Any], path: str) -> str:
    """Step-1 / position-1 acceptance per head: analytic, and measured in both drafting modes."""
    figure, axes = new_axes()
    names = list(results["ablation"])
    series = {
        "analytic 1 - TV, step 1": [m["eval_acceptance/step_1"] for m in results["ablation"].values()],
        **{
            f"measured {mode}, position 1": [measured(m, mode, 1) for m in results["ablation"].values()]
            for mode in DRAFT_SAMPLING_MODES
        },
    }
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        axes.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(names))], values, width, label=label)
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("acceptance")
    axes.set_title("(a) first draft: analytic and measured acceptance per head loss")
    axes.legend()
    figure.savefig(path, dpi=120)
    return path


def plot_sweep(results: dict[str, Any], path: str) -> str:
    figure, axes = new_axes()
    for head, mode in product(SWEEP_HEADS, DRAFT_SAMPLING_MODES):
        runs = sorted(
            (r for r in results["sweep"] if (r["head"], r["mode"]) == (head, mode)), key=lambda r: r["temperature"]
        )
        axes.plot(
            [r["temperature"] for r in runs],
            [r["acceptance"] for r in runs],
            marker="o",
            linestyle="-" if mode == "probabilistic" else "--",
            label=f"{head}, {mode}",
        )
    axes.set_xlabel("temperature (policy and draft)")
    axes.set_ylabel("accepted / drafted tokens")
    axes.set_ylim(bottom=0)
    axes.set_title("(b) acceptance against temperature")
    axes.legend()
    figure.savefig(path, dpi=120)
    return path


def plot_entropy(results: dict[str, Any], path: str) -> str:
    """Per-completion points (faint), entropy-bin means (markers) and the weighted fit (line) of each combination."""
    figure, axes = new_axes(8, 5)
    study = results["entropy"]
    for i, (key, entry) in enumerate(study["combos"].items()):
        color = f"C{i}"
        x, y, _ = combo_points(results["sweep"], tuple(key.split("/")))
        axes.scatter(x, y, s=6, alpha=0.25, color=color, linewidths=0)
        bins = [b for b in entry["bins"] if b["acceptance"] is not None]
        axes.plot([b["entropy"] for b in bins], [b["acceptance"] for b in bins], "o", color=color)
        fit = entry["fit"]
        if fit is not None:
            ends = np.array([np.nanmin(x), np.nanmax(x)])
            axes.plot(
                ends,
                fit["slope"] * ends + fit["intercept"],
                color=color,
                label=f"{key}: slope {fit['slope']:.3f} (paper {entry['paper_slope'] or '-'})",
            )
    axes.set_xlabel("policy mean entropy of the completion (nats)")
    axes.set_ylabel("accepted / drafted tokens")
    axes.set_ylim(bottom=0)
    axes.set_title("(c) acceptance against entropy, pooled over temperatures")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
