"""The vLLM rollout backend's pieces that need no vLLM: counters, the colocate hook and the server command."""

import json
import shlex
from types import SimpleNamespace

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.modeling.vllm_export import vllm_draft_weights
from bebop_trl.rollout.vllm_backend import (
    counts_from_llm_metrics,
    counts_from_prometheus_text,
    push_draft_weights_to_server,
    speculative_llm,
)
from bebop_trl.rollout.vllm_rollout import VLLMServerRollout
from bebop_trl.speculative import AcceptanceCounts
from bebop_trl.vllm_serve import api_server_command
from bebop_trl.vllm_serve import main as vllm_serve


# As a vLLM server with two engines prints them (counters get the `_total` suffix).
METRICS_PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 5.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="m"} 15.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 12.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 7.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="0"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="1"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="2"} 0.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_counters_from_the_server_page_sum_engines():
    counters = counts_from_prometheus_text(METRICS_PAGE)
    assert counters == AcceptanceCounts(15, 45, 18, [11, 6, 1])
    assert counters.as_tensor(3).tolist() == [15, 45, 18, 11, 6, 1]
    assert counters.as_tensor(2).tolist() == [15, 45, 18, 11, 6]


def test_counters_from_llm_metrics_and_round_differences():
    def snapshot(drafts, accepted, per_position):
        return [
            SimpleNamespace(name="vllm:spec_decode_num_drafts", value=drafts),
            SimpleNamespace(name="vllm:spec_decode_num_draft_tokens", value=3 * drafts),
            SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=accepted),
            SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=per_position),
            SimpleNamespace(name="vllm:prompt_tokens", value=99),
        ]

    before = counts_from_llm_metrics(snapshot(4, 5, [3, 2, 0]))
    after = counts_from_llm_metrics(snapshot(10, 12, [7, 4, 1]))
    assert after - before == AcceptanceCounts(6, 18, 7, [4, 2, 1])
    assert after - AcceptanceCounts() == after


def test_speculative_llm_adds_the_speculative_config_to_trls_colocated_engine(monkeypatch):
    from trl.generation import vllm_generation

    calls = []
    monkeypatch.setattr(vllm_generation, "LLM", lambda **kwargs: calls.append(kwargs), raising=False)
    fake = vllm_generation.LLM
    spec = {"method": "eagle", "model": "draft", "num_speculative_tokens": 3, "draft_sample_method": "probabilistic"}
    with speculative_llm(spec):
        vllm_generation.LLM(model="policy", seed=0)
    assert calls == [{"model": "policy", "seed": 0, "speculative_config": spec, "disable_log_stats": False}]
    assert vllm_generation.LLM is fake


def test_vllm_serve_exports_the_head_and_passes_its_speculative_config(load_tiny, tiny_checkpoints, tmp_path, capsys):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "head")
    draft_dir = tmp_path / "draft"
    argv = [
        "--model", tiny_checkpoints["llama"], "--mtp_head", str(tmp_path / "head"), "--num_speculative_tokens", "2",
        "--draft_sampling", "greedy", "--draft_dir", str(draft_dir), "--dry_run", "true", "--max-num-seqs", "8",
    ]  # fmt: skip
    vllm_serve(argv)
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[0] == "VLLM_SERVER_DEV_MODE=1"
    assert command[command.index("vllm.entrypoints.cli.main") + 1 :][:2] == ["serve", tiny_checkpoints["llama"]]
    assert json.loads(command[command.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    spec = json.loads(command[command.index("--speculative-config") + 1])
    assert spec == {
        "method": "eagle",
        "model": str(draft_dir),
        "num_speculative_tokens": 2,
        "draft_sample_method": "greedy",
    }
    assert (draft_dir / "model.safetensors").is_file() and command[-2:] == ["--max-num-seqs", "8"]


def test_vllm_serve_selects_the_file_weight_transfer(load_tiny, tiny_checkpoints, tmp_path, capsys):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "head")
    argv = [
        "--model", tiny_checkpoints["llama"], "--mtp_head", str(tmp_path / "head"), "--draft_dir", str(tmp_path / "d"),
        "--weight_transfer", "file", "--dry_run", "true",
    ]  # fmt: skip
    vllm_serve(argv)
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command.count("--weight-transfer-config") == 1
    assert json.loads(command[command.index("--weight-transfer-config") + 1]) == {"backend": "bebop_file"}


def test_vllm_serve_drafts_with_a_checkpoints_native_mtp_weights(tmp_path, capsys):
    argv = [
        "--model",
        "Qwen/Qwen3.5-0.8B",
        "--mtp_head",
        "native",
        "--draft_dir",
        str(tmp_path / "d"),
        "--dry_run",
        "true",
    ]
    vllm_serve(argv)
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    spec = json.loads(command[command.index("--speculative-config") + 1])
    # vLLM reads the mtp.* weights from the served checkpoint: nothing is exported.
    assert spec["method"] == "mtp" and spec["model"] == "Qwen/Qwen3.5-0.8B"
    assert not (tmp_path / "d").exists()


def test_api_server_command_starts_the_same_server_without_the_command_line():
    command = ["python", "-m", "vllm.entrypoints.cli.main", "serve", "my/model", "--port", "8000"]
    assert api_server_command(command) == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", "my/model", "--port", "8000",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a `vllm serve` command"):
        api_server_command(["python", "-m", "vllm.entrypoints.cli.main", "bench"])


class RecordingClient:
    """Stands for TRL's VLLMClient: records the requests and the streamed tensors (the NCCL part needs GPUs)."""

    base_url = "http://server:8000"

    def __init__(self):
        self.calls, self._updating_weights = [], False

    def _post(self, url, json):
        self.calls.append(url.removeprefix(self.base_url))

    def update_named_params(self, metadata, named_params):
        # Inside an open session TRL's client does not start (and finish) a policy update of its own.
        assert self._updating_weights
        self.calls.append(("update", metadata, dict(named_params)))


def test_head_weights_go_to_the_servers_drafter_in_one_draft_update_session(load_tiny):
    head = MTPHead.from_model(load_tiny("llama"))
    weights = vllm_draft_weights(head)
    client = RecordingClient()
    trainer = SimpleNamespace(
        vllm_generation=SimpleNamespace(mode="server", vllm_client=client),
        accelerator=SimpleNamespace(is_main_process=True),
    )
    backend = VLLMServerRollout(trainer, head, trl_generate=None, exactness=None)
    backend.head_updated()
    backend.push_head()

    start, (_, metadata, streamed), finish = client.calls
    assert (start, finish) == ("/start_draft_weight_update", "/finish_weight_update")
    assert [name for name, _, _ in metadata] == list(weights) == list(streamed)
    assert metadata[0][1:] == (
        str(weights["fc.weight"].dtype).removeprefix("torch."),
        list(weights["fc.weight"].shape),
    )
    for name, tensor in weights.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=0)
    assert not client._updating_weights and not backend._draft_stale


def test_a_failed_draft_update_still_closes_the_session():
    client = RecordingClient()
    client.update_named_params = lambda metadata, named_params: (_ for _ in ()).throw(RuntimeError("NCCL"))
    with pytest.raises(RuntimeError, match="NCCL"):
        push_draft_weights_to_server(client, {"fc.weight": torch.zeros(2, 4)})
    assert client.calls == ["/start_draft_weight_update", "/finish_weight_update"]
    assert not client._updating_weights
