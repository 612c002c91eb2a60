"""The quickstart's report: `report.json` (every figure), three PNG plots and `report.md`, all from one results dict.

The writer only formats what it is given, so it can be run again on a saved `report.json`:

```python
import json
from bebop_trl.quickstart.report import write_report

with open("outputs/quickstart/report.json") as f:
    write_report(json.load(f), "outputs/quickstart")
```
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCEPTANCE_PLOT = "acceptance_per_position.png"
SPEED_PLOT = "tokens_per_second.png"
ENTROPY_PLOT = "acceptance_vs_entropy.png"
# Recipe entries that say nothing about a head trained for a fixed number of steps.
RECIPE_NOISE = ("trainer", "num_train_epochs")
HEAD_LABELS = {"shipped": "shipped head", "ce": "live head, ce", "e2e_tv": "live head, e2e_tv"}


# How the report names `grpo_reward_answer_from`.
_REWARD_ON = {"completion": "the whole completion", "last_number": "the completion's last number"}


def write_report(results: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Writes `report.json`, the plots and `report.md` into `output_dir`.

    Args:
        results: The figures of a quickstart run, as [`run_quickstart`][bebop_trl.quickstart.run_quickstart]
            collects them (JSON values only).
        output_dir: The folder to write to.

    Returns:
        The path of every file written, by file name.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in (REPORT_JSON, ACCEPTANCE_PLOT, SPEED_PLOT, ENTROPY_PLOT)}
    with open(paths[REPORT_JSON], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    plot_acceptance(results["acceptance"], paths[ACCEPTANCE_PLOT])
    plot_speed(results["speed"], paths[SPEED_PLOT])
    plot_acceptance_entropy(results["grpo"], paths[ENTROPY_PLOT])
    paths[REPORT_MD] = os.path.join(output_dir, REPORT_MD)
    with open(paths[REPORT_MD], "w", encoding="utf-8") as f:
        f.write(render_markdown(results))
    return paths


# ------------------------------------------------------------------------------------------------------- markdown


def render_markdown(results: dict[str, Any]) -> str:
    """The report as Markdown: settings, wall time per stage, then one section per measurement."""
    sections = [
        _header(results),
        _settings_section(results),
        _stages_section(results["stages"], results["wall_seconds"]),
        _acceptance_section(results),
        _speed_section(results),
        _grpo_section(results),
    ]
    return "\n\n".join(sections) + "\n"


def _header(results: dict[str, Any]) -> str:
    settings = results["settings"]
    mode = "`--fast` smoke run (tiny budgets: the figures show the pipeline works, not what it reaches)"
    return (
        "# bebop-trl quickstart report\n\n"
        f"{mode if settings['fast'] else 'Full run'}, started {results['started']}, "
        f"{results['wall_seconds'] / 60:.1f} min in all. Every figure below was measured in this run; "
        f"`{REPORT_JSON}` holds them all."
    )


def _settings_section(results: dict[str, Any]) -> str:
    s, policy, distil = results["settings"], results["policy"], results["self_distillation"]
    task_config = ", ".join(f"{k}={v}" for k, v in s["task_config"].items()) or "the task's defaults"
    shipped = policy.get("shipped_head")
    if shipped:
        recipe = shipped.get("recipe") or {}
        head_line = (
            f"- shipped head: `{shipped['path']}` (layout `{shipped['layout']}`; trained with "
            + ", ".join(f"{k}={v}" for k, v in recipe.items() if k not in RECIPE_NOISE)
            + "); it drafts the speed measurement and the GRPO run"
        )
    else:
        head_line = (
            "- shipped head: none for this model; the live e2e_tv head drafts the speed measurement and GRPO run"
        )
    lines = [
        "## Settings",
        "",
        f"- policy: `{policy['name']}`, {policy['parameters'] / 1e6:.1f}M parameters, {policy['dtype']} on "
        f"{policy['device']}, torch threads: {policy['torch_threads']}",
        f"- task: reasoning-gym `{s['task']}` ({task_config}); temperature {s['temperature']:g} everywhere; "
        f"k = {s['num_speculative_tokens']} drafted tokens per cycle (speed: k = {s['speed_num_speculative_tokens']}); "
        f"seed {s['seed']}",
        head_line,
        f"- self-distillation: {distil['sequences']} task prompts (seed {s['seed']}), one completion each of at "
        f"most {s['distill_max_new_tokens']} tokens, {distil['completion_tokens']} completion tokens "
        f"({distil['mean_completion_length']:.1f} per sequence)",
        f"- head training (ce and e2e_tv alike): {s['train_steps']} steps of {s['train_batch_size']} sequences, "
        f"AdamW lr {s['learning_rate']:g}, {s['num_mtp_steps']} draft steps unrolled",
        f"- acceptance: {s['num_eval_prompts']} held-out prompts (questions no training prompt asks), up to "
        f"{s['eval_max_new_tokens']} tokens each, batches of {s['eval_batch_size']}",
        f"- speed: {s['speed_draft_sampling']} drafting, up to {s['speed_max_new_tokens']} tokens per prompt, "
        f"{s['speed_prompts_batch_1']} prompt(s) at batch 1 and {s['speed_batches_batch_8']} batch(es) of 8, "
        f"{s['speed_repeats']} repeat(s); step costs are medians of {s['step_cost_repeats']} rounds",
        f"- GRPO: {s['grpo_steps']} steps of {s['grpo_batch_size']} completions ({s['grpo_num_generations']} per "
        f"prompt, up to {s['grpo_max_completion_length']} tokens), {s['grpo_draft_sampling']} drafting, reward: "
        f"the task's verifier on {_REWARD_ON[s.get('grpo_reward_answer_from', 'completion')]}",
    ]
    return "\n".join(lines)


def _stages_section(stages: Sequence[dict[str, Any]], wall_seconds: float) -> str:
    rows = [[stage["stage"], f"{stage['seconds']:.1f}", f"{stage['cpu_seconds']:.1f}"] for stage in stages]
    rows.append(["**total**", f"**{wall_seconds:.1f}**", f"{sum(stage['cpu_seconds'] for stage in stages):.1f}"])
    return (
        "## Wall time per stage\n\n"
        "CPU seconds are the process's own; on a shared machine they show how much of the wall time it had the "
        "cores.\n\n" + _table(["stage", "wall seconds", "CPU seconds"], rows)
    )


def _acceptance_section(results: dict[str, Any]) -> str:
    acceptance = results["acceptance"]
    k = len(acceptance[0]["acceptance_per_position"]) if acceptance else 0
    rows = [
        [
            HEAD_LABELS.get(run["head"], run["head"]),
            run["draft_sampling"],
            *[_fmt(a, 3) for a in run.get("acceptance_per_position", [None] * k)],
            _fmt(run.get("acceptance_rate"), 3),
            _fmt(run.get("accepted_drafts_per_cycle"), 2),
            str(run.get("num_drafts", 0)),
            _fmt(run["mean_entropy"], 2),
        ]
        for run in acceptance
    ]
    header = [
        "head",
        "drafting",
        *[f"position {j + 1}" for j in range(k)],
        "acceptance rate",
        "accepted per cycle",
        "cycles",
        "entropy (nats)",
    ]
    training = [
        [
            HEAD_LABELS.get(name, name),
            str(t["steps"]),
            _fmt(t["kl_warm_start"], 2) if t["kl_warm_start"] is not None else "-",
            _fmt(t["final_loss"], 4),
            ", ".join(_fmt(a, 3) for a in t["train_acceptance_per_step"]),
            _fmt(t["train_seconds"], 1),
        ]
        for name, t in results["training"].items()
    ]
    return (
        "## Acceptance per draft position\n\n"
        f"![acceptance per position]({ACCEPTANCE_PLOT})\n\n"
        "Measured with the speculative engine on the held-out prompts. Position j is the fraction of cycles whose "
        "first j drafts were all accepted; `probabilistic` drafts from the head's distribution q and accepts with "
        "min(1, p/q), `greedy` drafts argmax q and accepts with probability p(draft).\n\n"
        + _table(header, rows)
        + "\n\nHead training (the same self-distilled data, steps and learning rate for both losses; analytic "
        "acceptance 1 - TV per draft step on the last logged training batches):\n\n"
        + _table(["head", "steps", "KL warm start", "final loss", "train acceptance per step", "seconds"], training)
    )


def _speed_section(results: dict[str, Any]) -> str:
    speed = results["speed"]
    rows, costs = [], []
    for batch, m in speed.items():
        per_repeat = ", ".join(_fmt(r, 2) for r in m["speedup_per_repeat"])
        rows.append(
            [
                batch,
                _fmt(m["plain"]["tokens_per_second"], 1),
                _fmt(m["speculative"]["tokens_per_second"], 1),
                f"{_speedup(m['speedup'])} ({per_repeat})",
                ", ".join(_fmt(a, 3) for a in m["speculative"].get("acceptance_per_position", [])) or "-",
                _fmt(m.get("expected_tokens_per_cycle"), 2),
                _fmt(m.get("cycle_cost"), 2),
                _speedup(m.get("implied_speedup_limit")),
                _fmt(m.get("fraction_of_limit"), 2),
            ]
        )
        seconds, relative = m["step_costs_seconds"], m["relative_step_costs"]
        costs.append(
            [
                batch,
                _fmt(1000 * seconds["decode"], 1),
                f"{_fmt(1000 * seconds['draft'], 1)} ({_fmt(relative['draft'], 2)})",
                f"{_fmt(1000 * seconds['verify'], 1)} ({_fmt(relative['verify'], 2)})",
            ]
        )
    k = results["settings"]["speed_num_speculative_tokens"]
    header = [
        "batch",
        "tokens/s, no head",
        "tokens/s, head",
        "speed-up (per repeat)",
        "acceptance per position",
        "E[tokens/cycle]",
        "cycle cost (decode steps)",
        "implied limit",
        "measured / implied",
    ]
    return (
        "## Engine speed with and without speculation\n\n"
        f"![tokens per second]({SPEED_PLOT})\n\n"
        "The same engine with the head and with `head=None`, on the same prompts, runs alternated. Tokens/s are "
        "noisy on a shared machine; the speed-up is the ratio of the two. The implied limit is E[tokens per cycle] "
        f"= 1 + sum of the acceptance per position (measured in the speculative runs) over the cycle cost, {k} "
        f"draft steps plus one {k + 1}-token verify pass, in units of a 1-token decode step at the same batch "
        "size. The measured speed-up can exceed it a little: what a step costs beyond the model pass (sampling, "
        "bookkeeping) is paid per token without a head and per cycle with one.\n\n"
        + _table(header, rows)
        + "\n\nStep costs in ms (relative to the decode step):\n\n"
        + _table(["batch", "decode, 1 token", "draft step", f"verify, {k + 1} tokens"], costs)
    )


def _grpo_section(results: dict[str, Any]) -> str:
    grpo = results["grpo"]
    fit = grpo["fit"]
    if fit:
        fit_line = (
            f"Fitted line over {fit['num_points']} completions (weighted by drafted tokens): acceptance = "
            f"{fit['slope']:.3f} x entropy {'-' if fit['intercept'] < 0 else '+'} {abs(fit['intercept']):.3f}, "
            f"r = {fit['r']:.3f} (mean entropy "
            f"{fit['mean_entropy']:.2f} nats, mean acceptance {fit['mean_acceptance']:.3f})."
        )
    else:
        fit_line = "No line could be fitted: fewer than two completions drafted, or their entropies were all equal."
    k = results["settings"]["num_speculative_tokens"]
    rows = [
        [
            str(step["step"]),
            _fmt(step["reward"], 3),
            _fmt(step["entropy"], 3),
            _fmt(step["acceptance_rate"], 3),
            ", ".join(_fmt(a, 3) for a in step["acceptance_per_position"]),
            _fmt(step["accepted_drafts_per_cycle"], 2),
            _fmt(step["rollout_tokens_per_second"], 1),
            _fmt(step["mean_completion_length"], 1),
            _fmt(step["step_seconds"], 1),
        ]
        for step in grpo["steps"]
    ]
    header = [
        "step",
        "reward",
        "entropy",
        "acceptance",
        f"acceptance, positions 1-{k}",
        "accepted per cycle",
        "rollout tokens/s",
        "completion length",
        "step seconds",
    ]
    return (
        "## GRPO with speculative rollouts: acceptance against entropy\n\n"
        f"![acceptance vs entropy]({ENTROPY_PLOT})\n\n"
        "Each point is one rollout completion: the policy's mean entropy over its tokens and the fraction of its "
        f"drafted tokens that were accepted. {fit_line}\n\n" + _table(header, rows)
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_acceptance(acceptance: Sequence[dict[str, Any]], path: str) -> None:
    """Acceptance per draft position, one line per head, one panel per drafting mode."""
    modes = list(dict.fromkeys(run["draft_sampling"] for run in acceptance))
    figure = _figure(5 * max(len(modes), 1), 4)
    for index, mode in enumerate(modes):
        axes = figure.add_subplot(1, len(modes), index + 1)
        for run in acceptance:
            per_position = run.get("acceptance_per_position")
            if run["draft_sampling"] != mode or not per_position:
                continue
            positions = range(1, len(per_position) + 1)
            axes.plot(positions, per_position, marker="o", label=HEAD_LABELS.get(run["head"], run["head"]))
            axes.set_xticks(list(positions))
        axes.set_title(f"{mode} drafting")
        axes.set_xlabel("draft position j")
        axes.set_ylabel("P(first j drafts accepted)")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
    figure.savefig(path, format="png", dpi=120)


def plot_speed(speed: dict[str, dict[str, Any]], path: str) -> None:
    """Tokens/s without and with the head, one panel per batch size, annotated with the measured and implied
    speed-ups."""
    figure = _figure(4 * max(len(speed), 1), 4)
    for index, (batch, m) in enumerate(speed.items()):
        axes = figure.add_subplot(1, len(speed), index + 1)
        values = [m["plain"]["tokens_per_second"] or 0.0, m["speculative"]["tokens_per_second"] or 0.0]
        bars = axes.bar(["no head", "head"], values, color=["tab:gray", "tab:blue"])
        axes.bar_label(bars, fmt="%.1f")
        limit = m.get("implied_speedup_limit")
        title = f"batch {batch}: {m['speedup']:.2f}x"
        if limit is not None:
            title += f" (implied limit {limit:.2f}x)"
        axes.set_title(title)
        axes.set_ylabel("tokens / s")
        axes.set_ylim(0, 1.2 * max([*values, 1e-9]))
    figure.savefig(path, format="png", dpi=120)


def plot_acceptance_entropy(grpo: dict[str, Any], path: str) -> None:
    """Per-completion acceptance against policy entropy over the GRPO steps (coloured by step), with the fit."""
    figure = _figure(7, 5)
    axes = figure.add_subplot()
    points, fit = grpo["points"], grpo["fit"]
    entropy, acceptance = points["entropy"], points["acceptance"]
    if entropy:
        # The trainer records a rollout under the global step before the update it feeds: step s of the logs is s - 1.
        steps = [step + 1 for step in points["step"]]
        scatter = axes.scatter(entropy, acceptance, c=steps, s=18, cmap="viridis", alpha=0.8)
        colorbar = figure.colorbar(scatter, ax=axes, label="GRPO step")
        colorbar.set_ticks(sorted(set(steps)))
    if fit and entropy:
        xs = [min(entropy), max(entropy)]
        axes.plot(
            xs,
            [fit["slope"] * x + fit["intercept"] for x in xs],
            color="crimson",
            label=f"slope {fit['slope']:.3f}, intercept {fit['intercept']:.3f}, r {fit['r']:.3f}",
        )
        axes.legend(loc="best")
    axes.set_xlabel("policy entropy of the completion (nats)")
    axes.set_ylabel("acceptance rate of its drafts")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    figure.savefig(path, format="png", dpi=120)
