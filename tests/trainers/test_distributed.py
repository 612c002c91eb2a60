import json
import os
import subprocess
import sys

import pytest

from bebop_trl import MTPHead


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [f"{a} plus {b} is {a + b}. " * 3 for a in range(8) for b in range(4)]


def run_train_mtp(tmp_path, model_path, data_dir, num_processes: int, batch_size: int) -> list[float]:
    output_dir = tmp_path / f"out-{num_processes}"
    config = "cpu_2proc.yaml" if num_processes == 2 else "single_process.yaml"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "examples", "accelerate_configs", config),
        "--main_process_port", "29533",
        os.path.join(ROOT, "examples", "train_mtp.py"),
        "--model_name_or_path", model_path, "--dataset_name", str(data_dir), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(batch_size), "--max_steps", "6", "--logging_steps", "1",
        "--num_mtp_steps", "2", "--save_strategy", "steps", "--save_steps", "6", "--use_cpu", "--report_to", "none",
        "--seed", "0", "--dataloader_drop_last", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert (output_dir / "model.safetensors").exists()
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_cpu_processes_match_one(tiny_checkpoints, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in TEXTS)
    one = run_train_mtp(tmp_path, tiny_checkpoints["llama"], data_dir, num_processes=1, batch_size=4)
    two = run_train_mtp(tmp_path, tiny_checkpoints["llama"], data_dir, num_processes=2, batch_size=2)
    assert len(one) == len(two) == 6
    # Same global batches; the two runs differ only in how the per-rank means are weighted.
    assert two == pytest.approx(one, rel=0.02)


def test_grpo_with_a_head_on_two_cpu_processes(tiny_checkpoints, load_tiny, tmp_path):
    head_dir = tmp_path / "head"
    MTPHead.from_model(load_tiny("llama")).save_pretrained(head_dir)
    output_dir = tmp_path / "grpo"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "examples", "accelerate_configs", "cpu_2proc.yaml"),
        "--main_process_port", "29534",
        os.path.join(ROOT, "examples", "grpo.py"),
        "--model_name_or_path", tiny_checkpoints["llama"], "--mtp_head", str(head_dir),
        "--mtp_online_loss", "tv", "--num_train_prompts", "16", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
        "--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        # 2 processes x 4 completions of at most 8 tokens; counts are summed over the processes.
        assert entry["rollout/draft_tokens"] > 0 and 0.0 <= entry["rollout/acceptance_rate"] <= 1.0
        assert entry["mtp_online/loss"] > 0
    # The head is updated online with gradients averaged over the processes, then saved by the main process.
    MTPHead.from_pretrained(output_dir / "mtp_head", policy=load_tiny("llama"))
    assert json.loads((output_dir / "acceptance_entropy_fit.json").read_text())["points"]["entropy"]
