"""The quickstart: the speed-up arithmetic, the measurements on a tiny model, the report writer, the CLI wiring, and
one end-to-end run of every stage on the tiny Llama (the `--model` path, which has no shipped head)."""

import itertools
import json
import os

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.cli import main
from bebop_trl.quickstart import QuickstartSettings, run_quickstart, write_report
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG, FAST_BUDGETS
from bebop_trl.rollout.measure import (
    expected_tokens_per_cycle,
    implied_speedup_limit,
    measure_acceptance,
    measure_engine_speed,
    measure_step_costs,
    relative_step_costs,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["1+2=", "3*4=", "hello", "x", "abc:", "7-5=", "Q: 2+2?", "zz"]


# ------------------------------------------------------------------------------------------------ speed-up arithmetic


def test_implied_speedup_limit_matches_a_hand_computation():
    # Step costs in seconds: a draft step is a quarter of a decode step, a 4-token verify pass 1.5 of one.
    relative = relative_step_costs({"decode": 0.08, "draft": 0.02, "verify": 0.12})
    assert relative == pytest.approx({"draft": 0.25, "verify": 1.5})
    acceptance = [0.6, 0.36, 0.2]  # P(first j drafts accepted), j = 1..3
    # A cycle emits 1 + 0.6 + 0.36 + 0.2 = 2.16 tokens for 3 * 0.25 + 1.5 = 2.25 decode steps.
    assert expected_tokens_per_cycle(acceptance) == pytest.approx(2.16)
    assert implied_speedup_limit(acceptance, relative) == pytest.approx(2.16 / 2.25)


def test_implied_speedup_limit_bounds():
    free_drafts = {"draft": 0.0, "verify": 1.0}
    # Every draft accepted and drafting free: k + 1 tokens per decode step; nothing accepted: no gain.
    assert implied_speedup_limit([1.0, 1.0, 1.0], free_drafts) == pytest.approx(4.0)
    assert implied_speedup_limit([0.0, 0.0, 0.0], free_drafts) == pytest.approx(1.0)
    assert implied_speedup_limit([0.0], {"draft": 0.5, "verify": 1.5}) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------- measurements


@pytest.fixture(scope="module")
def policy_and_head(tiny_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    head = MTPHead.from_model(policy).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return policy, tokenizer, head, prompts


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_measured_acceptance_is_consistent(policy_and_head, draft_sampling):
    policy, tokenizer, head, prompts = policy_and_head
    kwargs = dict(
        draft_sampling=draft_sampling, num_speculative_tokens=3, max_new_tokens=12, temperature=1.0, batch_size=3
    )
    result = measure_acceptance(policy, tokenizer, head, prompts, seed=0, **kwargs)
    per_position = result["acceptance_per_position"]
    assert len(per_position) == 3 and result["num_drafts"] > 0
    # Position j counts cycles whose first j drafts passed: non-increasing, and summing to the accepted length.
    assert all(a >= b for a, b in itertools.pairwise(per_position))
    assert result["accepted_drafts_per_cycle"] == pytest.approx(sum(per_position))
    assert result["acceptance_rate"] == pytest.approx(sum(per_position) / 3)
    assert 0 < result["tokens"] <= 12 * len(prompts)
    # The same seed gives the same figures: every head and mode is measured on the same random streams.
    assert measure_acceptance(policy, tokenizer, head, prompts, seed=0, **kwargs) == result


def test_engine_speed_pairs_runs_and_reports_their_ratio(policy_and_head):
    policy, tokenizer, head, prompts = policy_and_head
    batches = [prompts[:4], prompts[4:]]
    result = measure_engine_speed(
        policy,
        tokenizer,
        head,
        batches,
        repeats=2,
        draft_sampling="probabilistic",
        num_speculative_tokens=3,
        max_new_tokens=8,
        temperature=1.0,
        seed=0,
    )
    plain, speculative = result["plain"], result["speculative"]
    assert "acceptance_per_position" not in plain and len(speculative["acceptance_per_position"]) == 3
    assert plain["seconds"] > 0 and speculative["seconds"] > 0
    assert 0 < plain["tokens"] <= 2 * 8 * len(prompts)
    assert result["speedup"] == pytest.approx(speculative["tokens_per_second"] / plain["tokens_per_second"])
    assert len(result["speedup_per_repeat"]) == 2


@pytest.mark.parametrize("batch_size", [1, 4])
def test_step_costs_time_the_three_steps_of_a_cycle(policy_and_head, batch_size):
    policy, tokenizer, head, prompts = policy_and_head
    costs = measure_step_costs(
        policy,
        head,
        prompts[:batch_size],
        pad_token_id=tokenizer.pad_token_id,
        num_speculative_tokens=3,
        temperature=1.0,
        repeats=2,
    )
    assert set(costs) == {"decode", "verify", "draft"} and all(c > 0 for c in costs.values())


# -------------------------------------------------------------------------------------------------------- the report


def fake_results(with_fit: bool = True) -> dict:
    """A results dict as run_quickstart collects it, with round figures to look for in the report."""
    settings = QuickstartSettings.create(fast=True, output_dir="unused").to_dict()
    acceptance = [
        {
            "head": head,
            "draft_sampling": mode,
            "tokens": 200,
            "seconds": 0.0,
            "tokens_per_second": None,
            "mean_entropy": 1.25,
            "num_drafts": 50,
            "acceptance_per_position": [a, a / 2, a / 4],
            "acceptance_rate": 7 * a / 12,
            "accepted_drafts_per_cycle": 7 * a / 4,
        }
        for head, a in (("shipped", 0.8), ("ce", 0.4), ("e2e_tv", 0.6))
        for mode in ("probabilistic", "greedy")
    ]
    speed_entry = {
        "plain": {"tokens": 100, "seconds": 10.0, "tokens_per_second": 10.0, "mean_entropy": 1.0},
        "speculative": {
            "tokens": 137,
            "seconds": 10.0,
            "tokens_per_second": 13.7,
            "mean_entropy": 1.0,
            "num_drafts": 40,
            "acceptance_per_position": [0.6, 0.36, 0.2],
            "acceptance_rate": 0.3867,
            "accepted_drafts_per_cycle": 1.16,
        },
        "speedup": 1.37,
        "speedup_per_repeat": [1.31, 1.43],
        "step_costs_seconds": {"decode": 0.08, "draft": 0.02, "verify": 0.12},
        "relative_step_costs": {"draft": 0.25, "verify": 1.5},
        "expected_tokens_per_cycle": 2.16,
        "cycle_cost": 2.25,
        "implied_speedup_limit": 0.96,
        "fraction_of_limit": 1.37 / 0.96,
    }
    fit = {
        "slope": -0.123,
        "intercept": 0.456,
        "r": -0.5,
        "num_points": 3,
        "total_weight": 30.0,
        "mean_entropy": 1.5,
        "mean_acceptance": 0.3,
    }
    return {
        "settings": settings,
        "started": "2026-01-01T00:00:00+00:00",
        "stages": [
            {"stage": "load policy", "seconds": 1.5, "cpu_seconds": 2.5},
            {"stage": "GRPO", "seconds": 42.25, "cpu_seconds": 80.0},
        ],
        "policy": {
            "name": "tiny",
            "parameters": 2_500_000,
            "device": "cpu",
            "dtype": "float32",
            "torch_threads": 2,
            "shipped_head": {"path": "heads/tiny", "layout": "eagle", "recipe": {"loss_type": "e2e_tv"}},
        },
        "self_distillation": {"sequences": 16, "completion_tokens": 320, "mean_completion_length": 20.0},
        "training": {
            loss: {
                "loss_type": loss,
                "steps": 8,
                "kl_warm_start": 0.2 if loss == "e2e_tv" else None,
                "final_loss": 0.5,
                "train_acceptance_per_step": [0.5, 0.4, 0.3],
                "train_seconds": 3.0,
                "head_dir": f"heads/{loss}",
            }
            for loss in ("ce", "e2e_tv")
        },
        "acceptance": acceptance,
        "speed": {"1": speed_entry, "8": {**speed_entry, "speedup": 2.05, "speedup_per_repeat": [2.05]}},
        "grpo": {
            "steps": [
                {
                    "step": 1,
                    "reward": 0.25,
                    "entropy": 1.5,
                    "acceptance_rate": 0.3,
                    "acceptance_per_position": [0.5, 0.25, 0.15],
                    "accepted_drafts_per_cycle": 0.9,
                    "rollout_tokens_per_second": 12.5,
                    "mean_completion_length": 30.0,
                    "step_seconds": 20.0,
                }
            ],
            "fit": fit if with_fit else None,
            "points": {
                "entropy": [1.0, 1.5, 2.0],
                "acceptance": [0.4, 0.3, 0.2],
                "weight": [9, 12, 9],
                "step": [0] * 3,
            },
        },
        "wall_seconds": 43.75,
    }


def test_report_writer_writes_the_figures_it_is_given(tmp_path):
    results = fake_results()
    paths = write_report(results, str(tmp_path))
    for name in ("report.md", "report.json", "acceptance_per_position.png", "tokens_per_second.png"):
        assert os.path.isfile(paths[name])
    for name in ("acceptance_per_position.png", "tokens_per_second.png", "acceptance_vs_entropy.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((tmp_path / "report.json").read_text()) == results
    report = (tmp_path / "report.md").read_text()
    for figure in (
        "| shipped head | probabilistic | 0.800 | 0.400 | 0.200 | 0.467 | 1.40 | 50 | 1.25 |",
        "| live head, ce | greedy | 0.400 | 0.200 | 0.100 |",
        "| 1 | 10.0 | 13.7 | 1.37x (1.31, 1.43) | 0.600, 0.360, 0.200 | 2.16 | 2.25 | 0.96x | 1.43 |",
        "| 8 | 10.0 | 13.7 | 2.05x (2.05) |",
        "| 1 | 80.0 | 20.0 (0.25) | 120.0 (1.50) |",
        "acceptance = -0.123 x entropy + 0.456, r = -0.500",
        "| 1 | 0.250 | 1.500 | 0.300 | 0.500, 0.250, 0.150 | 0.90 | 12.5 | 30.0 | 20.0 |",
        "| load policy | 1.5 | 2.5 |",
        "| GRPO | 42.2 | 80.0 |",
        "| **total** | **43.8** | 82.5 |",
        "| live head, e2e_tv | 8 | 0.20 | 0.5000 | 0.500, 0.400, 0.300 | 3.0 |",
        "`--fast` smoke run",
        "![acceptance per position](acceptance_per_position.png)",
    ):
        assert figure in report, figure


def test_report_writer_without_fit_or_drafts(tmp_path):
    results = fake_results(with_fit=False)
    results["policy"].pop("shipped_head")
    entry = results["speed"]["1"]
    for key in ("expected_tokens_per_cycle", "cycle_cost", "implied_speedup_limit", "fraction_of_limit"):
        entry.pop(key)
    entry["speculative"] = {k: v for k, v in entry["speculative"].items() if "accept" not in k and k != "num_drafts"}
    write_report(results, str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "No line could be fitted" in report
    assert "shipped head: none for this model" in report
    assert "| 1 | 10.0 | 13.7 | 1.37x (1.31, 1.43) | - | - | - | - | - |" in report


# --------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def captured_settings(monkeypatch):
    calls = []
    monkeypatch.setattr("bebop_trl.quickstart.run_quickstart", calls.append)
    return calls


def test_cli_default_is_the_full_run_on_the_embedded_model(captured_settings):
    assert main(["quickstart"]) == 0
    (settings,) = captured_settings
    assert settings == QuickstartSettings()
    assert settings.uses_embedded_model and settings.task_config() == DEFAULT_TASK_CONFIG


def test_cli_passes_every_option(captured_settings, tmp_path):
    argv = ["quickstart", "--fast", "--output-dir", str(tmp_path), "--seed", "3", "--model", "org/m", "--task", "x"]
    assert main(argv) == 0
    (settings,) = captured_settings
    assert (settings.output_dir, settings.seed, settings.model, settings.task) == (str(tmp_path), 3, "org/m", "x")
    assert settings.fast and not settings.uses_embedded_model and settings.task_config() == {}
    assert all(getattr(settings, name) == value for name, value in FAST_BUDGETS.items())


def test_cli_threads_sets_torchs_cpu_threads(captured_settings):
    before = torch.get_num_threads()
    try:
        assert main(["quickstart", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and len(captured_settings) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["quickstart", "--threads", "0"])


def test_settings_reject_unknown_fields():
    with pytest.raises(TypeError):
        QuickstartSettings.create(fast=True, train_stpes=3)


# ------------------------------------------------------------------------------------------------------ end to end


def test_every_stage_runs_on_a_tiny_model(tiny_checkpoints, tmp_path):
    pytest.importorskip("reasoning_gym")
    settings = QuickstartSettings.create(
        fast=True,
        output_dir=str(tmp_path),
        model=tiny_checkpoints["llama"],
        num_train_prompts=8,
        distill_max_new_tokens=12,
        train_steps=2,
        eval_max_new_tokens=12,
        speed_max_new_tokens=8,
        step_cost_repeats=1,
        grpo_max_completion_length=8,
    )
    report = run_quickstart(settings)
    assert report == str(tmp_path / "report.md")
    results = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [
        "load policy",
        "self-distillation",
        "train ce head",
        "train e2e_tv head",
        "acceptance",
        "engine speed",
        "GRPO",
    ]
    assert "shipped_head" not in results["policy"]
    # Without a shipped head: the two live heads, in both modes.
    assert [(r["head"], r["draft_sampling"]) for r in results["acceptance"]] == [
        (head, mode) for head in ("ce", "e2e_tv") for mode in ("probabilistic", "greedy")
    ]
    assert set(results["speed"]) == {"1", "8"}
    assert all(set(m["step_costs_seconds"]) == {"decode", "draft", "verify"} for m in results["speed"].values())
    assert [s["step"] for s in results["grpo"]["steps"]] == [1, 2]
    assert len(results["grpo"]["points"]["entropy"]) > 0
    for loss in ("ce", "e2e_tv"):
        assert os.path.isfile(tmp_path / "heads" / loss / "model.safetensors")
    for name in ("acceptance_per_position.png", "tokens_per_second.png", "acceptance_vs_entropy.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
