"""vLLM draft checkpoints written by `MTPHead.export_vllm` (vLLM itself loads them in the vLLM lane)."""

import json

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.modeling.hub import load_tensors
from bebop_trl.modeling.vllm_export import vllm_draft_weights, vllm_speculative_config


def perturbed(head: MTPHead) -> MTPHead:
    """The head with every weight made distinct, so that a swapped name cannot go unnoticed."""
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn_like(param))
    return head


def test_eagle_export_has_vllm_eagle_names_and_config(load_tiny, tmp_path):
    policy = load_tiny("llama")
    head = perturbed(MTPHead.from_model(policy, num_layers=2, layout="eagle"))
    folder = head.export_vllm(tmp_path / "draft")

    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, policy.config.hidden_size)
    assert config["vocab_size"] == policy.config.vocab_size
    weights = load_tensors(f"{folder}/model.safetensors")
    # EAGLE-1: fc on cat(embedding, hidden), no input norm on layer 0 (layer 1 keeps its own), no final norm, and
    # neither embedding nor lm_head (vLLM shares the target's).
    assert "fc.weight" in weights and "layers.1.input_layernorm.weight" in weights
    assert not any(
        k.startswith(("layers.0.input_layernorm", "norm", "embed_tokens", "lm_head", "model.")) for k in weights
    )
    state = head.state_dict()
    assert len(weights) == len(state)
    torch.testing.assert_close(weights["fc.weight"], state["fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        weights["layers.1.mlp.down_proj.weight"], state["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0
    )
    assert vllm_draft_weights(head).keys() == weights.keys()


def test_mtp_export_round_trips_through_the_native_reader(load_tiny, tmp_path):
    policy = load_tiny("qwen3_5")
    head = perturbed(MTPHead.from_model(policy, layout="mtp"))
    folder = head.export_vllm(tmp_path / "draft", target_config=policy.config)

    index = json.loads((tmp_path / "draft" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and all(k.startswith("mtp.") for k in index["weight_map"])
    # vLLM's method="mtp" reads the `mtp.*` tensors listed in the index, as `MTPHead.from_native` does.
    reloaded = MTPHead.from_native(folder, policy=policy, check_base_model=False)
    for name, value in head.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


def test_mtp_export_needs_the_target_config(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("qwen3_5"), layout="mtp")
    with pytest.raises(ValueError, match="target_config"):
        head.export_vllm(tmp_path)


@pytest.mark.parametrize(
    ("architecture", "layout", "method"), [("llama", "eagle", "eagle"), ("qwen3_5", "mtp", "mtp")]
)
def test_speculative_config_names_the_method_of_the_layout(load_tiny, architecture, layout, method):
    head = MTPHead.from_model(load_tiny(architecture), layout=layout)
    config = vllm_speculative_config(head.config, "draft", num_speculative_tokens=4, draft_sampling="greedy")
    assert config == {"method": method, "model": "draft", "num_speculative_tokens": 4, "draft_sample_method": "greedy"}
    with pytest.raises(ValueError, match="draft_sampling"):
        vllm_speculative_config(head.config, "draft", num_speculative_tokens=4, draft_sampling="typical")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        vllm_speculative_config(head.config, "draft", num_speculative_tokens=0)


def test_eagle_export_refuses_decoder_layers_vllm_cannot_run(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("qwen3"), layout="eagle")
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM.*rollout_backend='torch'"):
        head.export_vllm(tmp_path)
    assert not any(tmp_path.iterdir())
