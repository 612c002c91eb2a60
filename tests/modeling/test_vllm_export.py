"""vLLM draft checkpoints written by `MTPHead.export_vllm` (vLLM itself loads them in the vLLM lane)."""

import json
from importlib.metadata import entry_points

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from bebop_trl import MTPHead
from bebop_trl.modeling.hub import load_tensors
from bebop_trl.modeling.native import fuse_experts, split_experts
from bebop_trl.modeling.vllm_export import (
    DRAFT_VOCAB_DRAFTER_PREFIX,
    VLLM_EAGLE_ARCHITECTURES,
    vllm_draft_weights,
    vllm_speculative_config,
)
from bebop_trl.testing import tiny_causal_lm
from bebop_trl.vllm_plugin import EAGLE_DRAFTERS, register


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


@pytest.mark.parametrize("architecture", ["qwen3_5", "qwen3_next"])
def test_mtp_export_round_trips_through_the_native_reader(architecture, tmp_path):
    policy = tiny_causal_lm(architecture)
    head = perturbed(MTPHead.from_model(policy, layout="mtp"))
    folder = head.export_vllm(tmp_path / "draft", target_config=policy.config)

    index = json.loads((tmp_path / "draft" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and all(k.startswith("mtp.") for k in index["weight_map"])
    if architecture == "qwen3_next":  # experts one by one, as checkpoints store them and vLLM reads them
        assert "mtp.layers.0.mlp.experts.3.up_proj.weight" in index["weight_map"]
        assert not any(k.endswith("gate_up_proj") for k in index["weight_map"])
    # vLLM's method="mtp" reads the `mtp.*` tensors listed in the index, as `MTPHead.from_native` does.
    reloaded = MTPHead.from_native(folder, policy=policy, check_base_model=False)
    for name, value in head.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


def test_mtp_export_needs_the_target_config(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("qwen3_5"), layout="mtp")
    with pytest.raises(ValueError, match="target_config"):
        head.export_vllm(tmp_path)


def test_eagle3_export_in_the_speculators_format_wraps_the_same_drafter_config(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("llama"), layout="eagle3", aux_layers=[0, 1]).with_draft_vocab([0, 2, 5])
    with open(f"{head.export_vllm(tmp_path / 'plain')}/config.json", encoding="utf-8") as f:
        plain = json.load(f)
    folder = head.export_vllm(tmp_path / "speculators", speculators_verifier="my-org/policy", num_speculative_tokens=4)
    with open(f"{folder}/config.json", encoding="utf-8") as f:
        config = json.load(f)

    assert config["speculators_model_type"] == "eagle3" and config["transformer_layer_config"] == plain
    assert (config["draft_vocab_size"], config["eagle_aux_hidden_state_layer_ids"]) == (3, [0, 1])
    assert config["norm_before_residual"] is False  # the format's default would be True
    speculators = config["speculators_config"]
    assert speculators["verifier"] == {"name_or_path": "my-org/policy", "architectures": ["LlamaForCausalLM"]}
    assert speculators["proposal_methods"][0]["speculative_tokens"] == 4
    plain_weights, weights = (
        load_tensors(f"{tmp_path}/plain/model.safetensors"),
        load_tensors(f"{folder}/model.safetensors"),
    )
    assert plain_weights.keys() == weights.keys()


def test_only_eagle3_heads_export_in_the_speculators_format(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("llama"), layout="eagle")
    with pytest.raises(ValueError, match="speculators format holds EAGLE-3"):
        head.export_vllm(tmp_path, speculators_verifier="my-org/policy")


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


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_eagle_export_of_qwen_heads_keeps_their_decoder_layers(load_tiny, architecture, tmp_path):
    head = perturbed(MTPHead.from_model(load_tiny(architecture), layout="eagle"))
    folder = head.export_vllm(tmp_path)
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [head.config.base_architecture]
    assert config["model_type"] == architecture
    weights = load_tensors(f"{folder}/model.safetensors")
    # Qwen3's q/k norms and Qwen2's q/k/v biases are part of what vLLM's drafter must load.
    extra = {"qwen2": "layers.0.self_attn.q_proj.bias", "qwen3": "layers.0.self_attn.q_norm.weight"}[architecture]
    assert torch.equal(weights[extra], vllm_draft_weights(head)[extra])


def test_vllm_plugin_registers_a_drafter_for_every_architecture_vllm_lacks():
    drafters = {f"Eagle{arch}" for arch in VLLM_EAGLE_ARCHITECTURES} - {"EagleLlamaForCausalLM"}  # vLLM's own
    with_draft_vocab = {DRAFT_VOCAB_DRAFTER_PREFIX + arch for arch in VLLM_EAGLE_ARCHITECTURES}
    assert set(EAGLE_DRAFTERS) == drafters | with_draft_vocab
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("bebop_trl.")]
    assert plugin.load() is register


def test_eagle_export_refuses_decoder_layers_vllm_cannot_run(tmp_path):
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    head = MTPHead.from_model(AutoModelForCausalLM.from_config(config), layout="eagle")
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*rollout_backend='torch'"):
        head.export_vllm(tmp_path)
    assert not any(tmp_path.iterdir())


def test_expert_fusion_matches_the_checkpoint_format_of_transformers(tmp_path):
    model = tiny_causal_lm("qwen3_next")
    model.save_pretrained(tmp_path)  # transformers writes the experts one by one
    stored = load_tensors(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.2.gate_proj.weight" in stored
    fused = fuse_experts(stored)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=0)
    assert split_experts(fused).keys() == stored.keys()
    for name, value in split_experts(fused).items():
        torch.testing.assert_close(value, stored[name], rtol=0, atol=0)


def test_expert_fusion_names_an_incomplete_checkpoint():
    tensors = {f"mtp.layers.0.mlp.experts.0.{p}.weight": torch.zeros(2, 2) for p in ("gate_proj", "up_proj")}
    with pytest.raises(ValueError, match=r"experts lack \['0.down_proj'\]"):
        fuse_experts(tensors)
