"""Benchmark `bebop_trl.ops.mtp_loss` against the naive full-logits reference: time and peak memory.

Each (case, implementation) runs in a fresh Python subprocess, which allocates the inputs (float32, CPU unless
`--device cuda`), then times `--repeats` forward+backward passes (gradient with respect to `draft_hidden` only)
and reports the fastest wall-clock time and the process CPU time of that run. The fastest run is the least
disturbed one on a shared machine; the system load average is recorded next to every result.

Peak memory is measured per subprocess, so that no allocator cache or earlier case can hide or inflate it. On CPU
it is the growth of the process's peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) from just after the
inputs were allocated to after the last pass: everything the op allocated at its high-water mark, including the
saved activations of autograd. On CUDA it is `torch.cuda.max_memory_allocated()` minus the allocation after the
inputs. Cases whose naive run would not fit in `--memory-limit-gb` (estimated from the size of its [S*N, V] logits)
are skipped with the reason printed.

N is the number of start positions per draft step, so a case has S*N token slots. Results are printed as a table
and written as JSON to `--output`.

Usage:
    python benchmarks/bench_mtp_loss.py [--repeats 3] [--output benchmarks/results/mtp_loss.json]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


# (N, H, V, S, loss_type)
CASES = [
    (2048, 576, 49152, 1, "e2e_tv"),
    (2048, 576, 49152, 3, "e2e_tv"),
    (2048, 576, 49152, 1, "ce"),
    (2048, 576, 49152, 1, "kl"),
    (4096, 1024, 151936, 1, "e2e_tv"),
    (4096, 1024, 151936, 3, "e2e_tv"),
]
IMPLEMENTATIONS = ("naive", "mtp_loss")
# [S*N, V] float32 tensors live at the naive implementation's peak (logits, log-softmax and softmax of both models,
# and their gradients): measured as 5.8 to 6.8 on the smaller shape. Rounded up, because the machine is shared and
# an out-of-memory kill would take other work with it.
NAIVE_LOGITS_COPIES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "mtp_loss.json",
        help="where to write the JSON results",
    )
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward passes per case; the fastest counts")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="skip naive runs estimated above this")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the inputs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(**json.loads(args.child))))
        return

    results = []
    for num_positions, hidden, vocab, steps, loss_type in CASES:
        for implementation in IMPLEMENTATIONS:
            case = {
                "N": num_positions,
                "H": hidden,
                "V": vocab,
                "S": steps,
                "loss_type": loss_type,
                "implementation": implementation,
            }
            naive_gb = NAIVE_LOGITS_COPIES * steps * num_positions * vocab * 4 / 2**30
            if implementation == "naive" and naive_gb > args.memory_limit_gb:
                reason = f"naive needs ~{naive_gb:.0f} GB for its [S*N, V] logits, over {args.memory_limit_gb:g} GB"
                print(f"skip {_label(case)}: {reason}", flush=True)
                results.append({**case, "skipped": reason})
                continue
            child = json.dumps({**case, "repeats": args.repeats, "device": args.device})
            command = [sys.executable, __file__, "--child", child]
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                reason = f"failed: {completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else '?'}"
                print(f"skip {_label(case)}: {reason}", flush=True)
                results.append({**case, "skipped": reason})
                continue
            result = {**case, **json.loads(completed.stdout.strip().splitlines()[-1])}
            print(
                f"{_label(case)}: {result['time_s']:.2f} s, +{result['peak_mb']:.0f} MB, load {result['load']}",
                flush=True,
            )
            results.append(result)

    print()
    print(_table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "dtype": "float32",
    }
    args.output.write_text(json.dumps({"metadata": metadata, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


def _measure(
    N: int, H: int, V: int, S: int, loss_type: str, implementation: str, repeats: int, device: str
) -> dict[str, float]:
    """Runs one (case, implementation) in this process and returns its timing and peak memory."""
    from bebop_trl.ops import mtp_loss
    from bebop_trl.ops.reference import mtp_loss_reference

    torch.manual_seed(0)
    # Built in place so that no temporary raises the peak before the baseline is taken.
    target = torch.randn(S, N, H, device=device)
    draft = torch.randn(S, N, H, device=device).mul_(0.5).add_(target).requires_grad_()
    weight = torch.randn(V, H, device=device).mul_(2 / H**0.5)
    labels = torch.randint(V, (S, N), device=device)
    fn = mtp_loss if implementation == "mtp_loss" else mtp_loss_reference

    def step() -> None:
        out = fn(draft, target, weight, loss_type=loss_type, labels=labels)
        torch.autograd.grad(out.loss, draft)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    fastest = min(range(repeats), key=times.__getitem__)
    return {
        "time_s": times[fastest],
        "cpu_time_s": cpu_times[fastest],
        "times_s": times,
        "peak_mb": peak / 2**20,
        "load": round(os.getloadavg()[0], 1),
    }


def _label(case: dict) -> str:
    return f"N={case['N']} H={case['H']} V={case['V']} S={case['S']} {case['loss_type']} {case['implementation']}"


def _table(results: list[dict]) -> str:
    header = (
        f"{'N':>5} {'H':>5} {'V':>7} {'S':>2} {'loss':>7} | {'naive s':>8} {'mtp s':>8} {'time x':>7} | "
        f"{'naive MB':>9} {'mtp MB':>8} {'mem x':>6}"
    )
    lines = [header, "-" * len(header)]
    by_case: dict[tuple, dict[str, dict]] = {}
    for result in results:
        key = (result["N"], result["H"], result["V"], result["S"], result["loss_type"])
        by_case.setdefault(key, {})[result["implementation"]] = result
    for (num_positions, hidden, vocab, steps, loss_type), runs in by_case.items():
        naive, ours = runs.get("naive", {}), runs.get("mtp_loss", {})
        time_ratio = {"ratio": ours["time_s"] / naive["time_s"]} if "time_s" in ours and "time_s" in naive else {}
        memory_ratio = (
            {"ratio": ours["peak_mb"] / naive["peak_mb"]} if "peak_mb" in ours and "peak_mb" in naive else {}
        )
        lines.append(
            f"{num_positions:>5} {hidden:>5} {vocab:>7} {steps:>2} {loss_type:>7} | "
            f"{_cell(naive, 'time_s', 8, 2)} {_cell(ours, 'time_s', 8, 2)} {_cell(time_ratio, 'ratio', 7, 2)} | "
            f"{_cell(naive, 'peak_mb', 9, 0)} {_cell(ours, 'peak_mb', 8, 0)} {_cell(memory_ratio, 'ratio', 6, 3)}"
        )
    return "\n".join(lines)


def _cell(run: dict, key: str, width: int, digits: int) -> str:
    return f"{run[key]:>{width}.{digits}f}" if key in run else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
