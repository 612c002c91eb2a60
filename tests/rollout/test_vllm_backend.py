"""The vLLM rollout backend's pieces that need no vLLM: counters, the colocate hook and the server command."""

import importlib.util
import json
import logging
import shlex
import sys
from types import ModuleType, SimpleNamespace
from typing import Literal

import pytest
import torch

from bebop_trl import MTPHead, MTPHeadConfig
from bebop_trl.modeling import vllm_export
from bebop_trl.modeling.vllm_export import (
    rollout_drafts_speculative_config,
    vllm_draft_weights,
    vllm_speculative_config,
)
from bebop_trl.rollout.vllm_backend import (
    block_verification_unsupported,
    counts_from_llm_metrics,
    counts_from_prometheus_text,
    push_draft_weights_to_server,
    require_block_verification,
    speculative_llm,
)
from bebop_trl.rollout.vllm_rollout import VLLMServerRollout
from bebop_trl.speculative import AcceptanceCounts
from bebop_trl.vllm_plugin import compat
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
    # vLLM's counters have no rollout-draft share: those three entries are 0.
    assert counters.as_tensor(3).tolist() == [15, 45, 18, 0, 0, 0, 11, 6, 1]
    assert counters.as_tensor(2).tolist() == [15, 45, 18, 0, 0, 0, 11, 6]


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


def serve_dry_run(argv: list[str], capsys) -> dict:
    """The speculative config of the command `bebop-trl vllm-serve --dry_run true` prints for `argv`."""
    vllm_serve([*argv, "--dry_run", "true"])
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    return json.loads(command[command.index("--speculative-config") + 1])


def test_block_verification_reaches_the_speculative_config_only_when_asked(tmp_path):
    head_config = MTPHeadConfig()
    standard = vllm_speculative_config(head_config, tmp_path, num_speculative_tokens=2)
    block = vllm_speculative_config(head_config, tmp_path, num_speculative_tokens=2, rejection_sample_method="block")
    # vLLM's default is left out: vLLM releases without the field accept the config as before.
    assert "rejection_sample_method" not in standard
    assert block == standard | {"rejection_sample_method": "block"}


def with_arctic_inference(monkeypatch, installed: bool) -> None:
    """Makes `arctic_inference` look installed or not to the choice of the rollout-drafts method."""
    find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        if name == "arctic_inference":
            return importlib.util.spec_from_loader(name, loader=None) if installed else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)


def test_rollout_drafts_run_as_suffix_decoding_where_arctic_inference_is_installed(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=vllm_export.__name__)
    with_arctic_inference(monkeypatch, installed=True)
    assert rollout_drafts_speculative_config(num_speculative_tokens=4) == {
        "method": "suffix",
        "num_speculative_tokens": 4,
    }
    with_arctic_inference(monkeypatch, installed=False)
    assert rollout_drafts_speculative_config(num_speculative_tokens=3, rejection_sample_method="block") == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "rejection_sample_method": "block",
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 8,
    }
    suffix, ngram = (record.getMessage() for record in caplog.records)
    assert "method='suffix'" in suffix and "earlier requests' outputs" in suffix
    assert "method='ngram'" in ngram and "own prompt and output only" in ngram and "arctic-inference" in ngram
    # A method given explicitly is not logged.
    caplog.clear()
    assert rollout_drafts_speculative_config(num_speculative_tokens=1, method="suffix")["method"] == "suffix"
    assert not caplog.records
    with pytest.raises(ValueError, match="'suffix' or 'ngram'"):
        rollout_drafts_speculative_config(num_speculative_tokens=3, method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        rollout_drafts_speculative_config(num_speculative_tokens=0, method="ngram")


def test_vllm_serve_drafts_from_rollouts_without_a_head(tiny_checkpoints, monkeypatch, capsys, tmp_path):
    with_arctic_inference(monkeypatch, installed=False)
    model = ["--model", tiny_checkpoints["llama"], "--draft_dir", str(tmp_path / "d")]
    spec = serve_dry_run([*model, "--rollout_drafts", "true", "--num_speculative_tokens", "2"], capsys)
    assert spec == {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 8}
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="rollout_drafts and a draft head"):
        serve_dry_run([*model, "--rollout_drafts", "true", "--mtp_head", "native"], capsys)
    with pytest.raises(ValueError, match="--mtp_head, or --rollout_drafts"):
        serve_dry_run(model, capsys)


def test_vllm_serve_passes_block_verification(load_tiny, tiny_checkpoints, tmp_path, capsys):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "head")
    argv = ["--model", tiny_checkpoints["llama"], "--mtp_head", str(tmp_path / "head"), "--draft_dir", str(tmp_path)]
    assert serve_dry_run([*argv, "--rejection_sample_method", "block"], capsys)["rejection_sample_method"] == "block"
    assert "rejection_sample_method" not in serve_dry_run(argv, capsys)


def fake_vllm(monkeypatch, methods=("standard", "synthetic", "block"), has_triton=True, use_v2=None) -> None:
    """Stands for the parts of an installed vLLM that decide whether it verifies blocks (as in vLLM 0.32)."""
    speculative = ModuleType("vllm.config.speculative")
    speculative.RejectionSampleMethod = Literal[methods]
    modules = {
        "vllm": ModuleType("vllm"),
        "vllm.config": ModuleType("vllm.config"),
        "vllm.config.speculative": speculative,
        "vllm.envs": ModuleType("vllm.envs"),
        "vllm.triton_utils": ModuleType("vllm.triton_utils"),
    }
    modules["vllm"].config, modules["vllm"].envs = modules["vllm.config"], modules["vllm.envs"]
    modules["vllm.config"].speculative = speculative
    modules["vllm.envs"].VLLM_USE_V2_MODEL_RUNNER = use_v2
    modules["vllm.triton_utils"].HAS_TRITON = has_triton
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(compat, "installed_vllm_build", lambda: compat.VLLMBuild("vllm", "0.32.0"))


@pytest.mark.parametrize(
    ("vllm", "method", "reason"),
    [
        (dict(), "eagle", None),
        (dict(), "ngram", None),
        (dict(methods=("standard", "synthetic")), "eagle", "has no block verification"),
        (dict(has_triton=False), "ngram", "Triton has no backend"),
        (dict(use_v2=False), "eagle", "VLLM_USE_V2_MODEL_RUNNER=0"),
        (dict(), "suffix", "does not run method='suffix'"),
    ],
)
def test_block_verification_is_refused_where_vllm_would_verify_token_by_token(monkeypatch, vllm, method, reason):
    fake_vllm(monkeypatch, **vllm)
    if reason is None:
        assert block_verification_unsupported(method) is None
        require_block_verification(method)
        return
    assert reason in block_verification_unsupported(method)
    with pytest.raises(ValueError, match="needs vLLM's Model Runner V2") as error:
        require_block_verification(method)
    assert reason in str(error.value) and "vllm 0.32.0" in str(error.value)
    assert "rollout_backend='torch'" in str(error.value) and "rejection_sample_method='standard'" in str(error.value)


def test_a_built_engines_model_runner_decides_block_verification(monkeypatch):
    fake_vllm(monkeypatch)
    assert block_verification_unsupported("eagle", SimpleNamespace(use_v2_model_runner=True)) is None
    with pytest.raises(ValueError, match="its engine runs the V1 model runner"):
        require_block_verification("eagle", SimpleNamespace(use_v2_model_runner=False))


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
