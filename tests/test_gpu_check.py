"""The prepared GPU check (`benchmarks/gpu_check.py`), run end to end on CPU with the tiny model."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from bebop_trl.embedded import SMOLLM2_HEAD_DIR
from bebop_trl.rollout.measure import implied_speedup_limit


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_quick_run_reports_every_part(gpu_check, tmp_path, capsys):
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--tiny", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["triton"] == {"status": "skipped: no CUDA"}
    assert result["case"] == "tiny" and result["versions"]["torch"]
    engine = result["engine"]
    assert set(engine["batch_sizes"]) == {"1", "8"}
    for by_batch in engine["batch_sizes"].values():
        costs = by_batch["step_costs"]
        assert set(costs["seconds"]) == {"decode", "draft", "verify_2", "verify_3", "verify_4", "verify_5"}
        assert all(seconds > 0 for seconds in costs["seconds"].values())
        assert all(cost > 0 for cost in costs["decode_steps"].values())
        assert costs["cycle_cost"] > 0 and costs["limit_all_accepted"] > costs["limit_at_reference_acceptance"] > 0
        speed = by_batch["speed"]
        assert speed["no head"]["tokens"] > 0 and speed["head"]["tokens"] > 0
        assert speed["no head"]["acceptance_per_position"] is None
        assert len(speed["head"]["acceptance_per_position"]) == 3
        assert speed["speedup"] > 0 and speed["implied_limit"] > 0
    printed = capsys.readouterr().out
    assert "Part 1" in printed and "Part 2a" in printed and "Part 2b" in printed and "Summary" in printed


def test_speedup_limit_is_the_package_formula(gpu_check):
    acceptance = [0.6, 0.3, 0.15]
    relative = {"draft": 0.1, "verify_4": 1.3}
    expected = implied_speedup_limit(acceptance, {"draft": 0.1, "verify": 1.3})
    assert gpu_check.cycle_speedup_limit(acceptance, relative) == pytest.approx(expected)


def test_junit_counts_reads_passes_failures_errors_and_skips(gpu_check, tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.ops.a" name="test_ok"/>'
        '<testcase classname="tests.ops.a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.ops.b" name="test_setup"><error message="y"/></testcase>'
        '<testcase classname="tests.ops.b" name="test_skip"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(report)
    assert counts == {
        "passed": 1,
        "failed": 2,
        "skipped": 1,
        "failures": ["tests.ops.a::test_bad", "tests.ops.b::test_setup"],
    }


def test_random_model_config_fits_the_shipped_head(gpu_check):
    config = json.loads(gpu_check.RANDOM_CONFIG.read_text())
    head_decoder = json.loads((pathlib.Path(SMOLLM2_HEAD_DIR) / "config.json").read_text())["decoder_config"]
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
        assert config[field] == head_decoder[field], field
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]


def test_engine_and_script_import_without_trl():
    # A machine without trl (the GPU machine) must still import the engine, the loss op and the script.
    code = (
        "import importlib.util, sys\n"
        "class NoTrl:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'trl':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoTrl())\n"
        "import bebop_trl, bebop_trl.speculative, bebop_trl.ops, bebop_trl.modeling, bebop_trl.embedded\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'MTPTrainer' in dir(bebop_trl)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SCRIPT.parent.parent)
