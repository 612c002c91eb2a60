"""`run_quickstart`: the stages in order, each timed, then the report."""

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from transformers import set_seed

from .report import REPORT_MD, write_report
from .settings import QuickstartSettings
from .stages import (
    LIVE_LOSSES,
    SHIPPED,
    acceptance_stage,
    describe_policy,
    grpo_stage,
    load_policy,
    self_distillation_stage,
    speed_stage,
    task_prompts,
    train_head,
)


NUM_STAGES = 8


class StageClock:
    """Announces each stage as it starts and records its wall time and the process's CPU time.

    On a shared machine the CPU time shows how much of the wall time the run actually had the cores.

    Attributes:
        records: `{"stage": name, "seconds": wall time, "cpu_seconds": CPU time}` of every finished stage, in
            order.
    """

    def __init__(self, total: int):
        self.total = total
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        """Times the body as stage `name`; `description` is printed when it starts."""
        index = len(self.records) + 1
        print(f"\n[{index}/{self.total}] {description}", flush=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        seconds = time.perf_counter() - started
        self.records.append({"stage": name, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_started})
        print(f"[{index}/{self.total}] {name}: {seconds:.1f} s", flush=True)


def run_quickstart(settings: QuickstartSettings | None = None) -> str:
    """Runs the end-to-end job and writes its report.

    On the policy (the embedded SmolLM2-135M-Instruct by default) and a reasoning-gym task it self-distils task
    prompts, trains a head with `ce` and one with `e2e_tv` on them, measures the acceptance per draft position of
    both and of the shipped head in both drafting modes, measures the engine's tokens/s with and without the
    drafting head and the speed-up its step costs and acceptance imply, and runs a few GRPO steps with speculative
    rollouts. `output_dir` receives `report.md`, `report.json`, the plots, the trained heads and the GRPO run.

    Args:
        settings: What to run on and the stage budgets (default: the full run on the embedded model).

    Returns:
        The path of `report.md`.
    """
    settings = settings or QuickstartSettings()
    os.makedirs(settings.output_dir, exist_ok=True)
    set_seed(settings.seed)
    started = time.perf_counter()
    clock = StageClock(NUM_STAGES)
    results: dict[str, Any] = {
        "settings": settings.to_dict(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "stages": clock.records,
    }

    name = settings.model or "the embedded SmolLM2-135M-Instruct (converted from GGUF on first use)"
    with clock.stage("load policy", f"Loading {name}"):
        policy, tokenizer, shipped_head = load_policy(settings)
    results["policy"] = describe_policy(policy, shipped_head)

    with clock.stage("self-distillation", f"Self-distilling {settings.num_train_prompts} {settings.task} prompts"):
        train_prompts, held_out = task_prompts(settings, tokenizer, shipped_head=shipped_head is not None)
        data, results["self_distillation"] = self_distillation_stage(policy, tokenizer, train_prompts, settings)

    live_heads, results["training"] = {}, {}
    for loss_type in LIVE_LOSSES:
        with clock.stage(f"train {loss_type} head", f"Training an MTP head with {loss_type}"):
            live_heads[loss_type], results["training"][loss_type] = train_head(
                policy, tokenizer, data, loss_type, settings
            )
    heads = {SHIPPED: shipped_head, **live_heads} if shipped_head is not None else live_heads
    # The head that drafts the later stages: the shipped one, else the live head trained for acceptance.
    drafter = shipped_head if shipped_head is not None else live_heads["e2e_tv"]

    with clock.stage("acceptance", f"Measuring the acceptance of {len(heads)} heads on held-out prompts"):
        results["acceptance"] = acceptance_stage(policy, tokenizer, heads, held_out, settings)

    with clock.stage("engine speed", "Measuring tokens/s with and without speculation, and the step costs"):
        results["speed"] = speed_stage(policy, tokenizer, drafter, held_out, settings)

    with clock.stage("GRPO", f"Running {settings.grpo_steps} GRPO steps with speculative rollouts"):
        results["grpo"] = grpo_stage(policy, tokenizer, drafter, settings)

    results["wall_seconds"] = time.perf_counter() - started
    with clock.stage("report", f"Writing the report to {settings.output_dir}"):
        paths = write_report(results, settings.output_dir)
    print(summary(results, paths[REPORT_MD]), flush=True)
    return paths[REPORT_MD]


def summary(results: dict[str, Any], report_path: str) -> str:
    """A few lines with the run's key figures, for the terminal."""
    lines = ["", f"Report: {report_path} ({results['wall_seconds'] / 60:.1f} min)"]
    for run in results["acceptance"]:
        per_position = ", ".join(f"{a:.3f}" for a in run.get("acceptance_per_position", []))
        lines.append(f"  acceptance, {run['head']} head, {run['draft_sampling']}: [{per_position}]")
    for batch, m in results["speed"].items():
        limit = m.get("implied_speedup_limit")
        implied = f" (implied limit {limit:.2f}x)" if limit is not None else ""
        lines.append(f"  speed-up at batch {batch}: {m['speedup']:.2f}x{implied}")
    fit = results["grpo"]["fit"]
    if fit:
        lines.append(f"  GRPO acceptance vs entropy: slope {fit['slope']:.3f}, r {fit['r']:.3f}")
    return "\n".join(lines)
