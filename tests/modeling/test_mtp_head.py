import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bebop_trl import MTPHead, MTPHeadConfig
from bebop_trl.modeling import EAGLE_LAYOUT, MTP_LAYOUT, default_layout
from bebop_trl.testing import save_native_mtp_checkpoint, save_tiny_checkpoint, tiny_causal_lm


def perturbed(head: MTPHead) -> MTPHead:
    """The head with noise on every weight, so that attention and MLP contribute (they start at zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return head


def policy_hidden(policy, input_ids, attention_mask=None):
    out = policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.fixture
def tokens():
    torch.manual_seed(0)
    return torch.randint(4, 100, (2, 12))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_5"])
def test_from_model_builds_head_of_policy_architecture(load_tiny, arch, tokens):
    policy = load_tiny(arch)
    head = MTPHead.from_model(policy)
    expected_layout = MTP_LAYOUT if arch == "qwen3_5" else EAGLE_LAYOUT
    assert head.config.layout == default_layout(policy.config.model_type) == expected_layout
    assert type(head.model.layers[0]) is type(policy.model.layers[-1])
    state = head.state_dict()
    assert not any("embed_tokens" in k or "lm_head" in k for k in state), "policy weights leaked into the head"
    assert ("pre_fc_norm_hidden.weight" in state) == (expected_layout == MTP_LAYOUT)
    assert ("model.norm.weight" in state) == (expected_layout == MTP_LAYOUT)
    assert ("model.layers.0.input_layernorm.weight" in state) == (expected_layout == MTP_LAYOUT)
    with torch.no_grad():
        hidden = head(policy_hidden(policy, tokens)[:, :-1], tokens[:, 1:]).last_hidden_state
        logits = head.compute_logits(hidden)
    assert logits.shape == (2, 11, policy.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_init_copies_last_policy_layer_and_starts_as_identity(load_tiny, tokens):
    policy = load_tiny("qwen3")
    head = MTPHead.from_model(policy)
    source = policy.model.layers[-1].state_dict()
    for name, tensor in head.model.layers[0].state_dict().items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert tensor.abs().sum() == 0, f"{name}: residual branches start at zero"
        else:
            torch.testing.assert_close(tensor, source[name], rtol=0, atol=0)
    hidden_size = policy.config.hidden_size
    torch.testing.assert_close(head.fc.weight[:, hidden_size:], torch.eye(hidden_size))
    assert head.fc.weight[:, :hidden_size].abs().sum() == 0
    # An eagle head starts as the identity: its first drafts are the policy's own next-token distributions.
    with torch.no_grad():
        hidden = policy_hidden(policy, tokens)
        torch.testing.assert_close(head(hidden, tokens).last_hidden_state, hidden)

    random_head = MTPHead.from_model(policy, init_from_policy=False)
    assert not torch.equal(random_head.model.layers[0].mlp.up_proj.weight, source["mlp.up_proj.weight"])


@pytest.mark.parametrize("layout", [EAGLE_LAYOUT, MTP_LAYOUT])
def test_cached_drafting_matches_parallel_teacher_forcing(load_tiny, layout, tokens):
    policy = load_tiny("llama")
    head = perturbed(MTPHead.from_model(policy, layout=layout))
    with torch.no_grad():
        hidden = policy_hidden(policy, tokens)[:, :-1]
        parallel = head(hidden, tokens[:, 1:]).last_hidden_state
        cache, steps = head.new_cache(), []
        for t in range(hidden.shape[1]):
            out = head(hidden[:, t : t + 1], tokens[:, t + 1 : t + 2], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-5)


def test_left_padding_is_masked(load_tiny, tokens):
    policy = load_tiny("qwen2")
    head = perturbed(MTPHead.from_model(policy))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(tokens[:1])], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = head(policy_hidden(policy, tokens[:1])[:, :-1], tokens[:1, 1:]).last_hidden_state
        hidden = policy_hidden(policy, padded, mask)[:, :-1]
        # Slot t pairs the hidden state at t with token t+1: it is valid where position t is not padding.
        batched = head(hidden, padded[:, 1:], attention_mask=mask[:, :-1], position_ids=positions[:, :-1])
    torch.testing.assert_close(batched.last_hidden_state[:, pad:], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_exact(load_tiny, tmp_path, dtype, tokens):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy, recipe={"loss_type": "e2e_tv", "steps": 10}).to(dtype)
    with torch.no_grad():
        head.fc.weight.add_(torch.randn_like(head.fc.weight))  # not the init values
    head.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]

    loaded = MTPHead.from_pretrained(tmp_path, policy=policy)
    assert loaded.fc.weight.dtype == dtype
    original, restored = head.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    hidden = policy_hidden(policy, tokens)[:, :-1].detach()
    with torch.no_grad():
        assert torch.equal(
            head(hidden, tokens[:, 1:]).last_hidden_state, loaded(hidden, tokens[:, 1:]).last_hidden_state
        )

    stored = load_file(tmp_path / "model.safetensors")
    assert stored.keys() == original.keys()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bebop_mtp_head"
    assert config["base_model_name_or_path"] == policy.config.name_or_path
    assert config["hidden_size"] == 64 and config["vocab_size"] == 128
    assert config["base_architecture"] == "LlamaForCausalLM"
    assert config["recipe"] == {"loss_type": "e2e_tv", "steps": 10}


def test_loading_a_head_never_unpickles(load_tiny, tmp_path, monkeypatch):
    policy = load_tiny("llama")
    trained = MTPHead.from_model(policy)
    trained.save_pretrained(tmp_path / "head")
    # Pickles beside the head, as older trainers and tools leave them, must not be read.
    torch.save({"args": 1}, tmp_path / "head" / "training_args.bin")
    torch.save(trained.state_dict(), tmp_path / "head" / "pytorch_model.bin")
    save_native_mtp_checkpoint(tmp_path / "qwen35")
    native_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen35").eval()

    def refuse(*args, **kwargs):
        raise AssertionError("loading a head unpickled a file")

    for target in (torch, pickle):
        monkeypatch.setattr(target, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = MTPHead.from_pretrained(tmp_path / "head", policy=policy)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    MTPHead.from_native(tmp_path / "qwen35", policy=native_policy)


def test_model_card_has_hub_metadata_and_recipe(load_tiny, tmp_path):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy, recipe={"loss_type": "tv"}, metrics={"acceptance@1": 0.61})
    head.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "bebop-trl"
    assert metadata["base_model"] == policy.config.name_or_path
    assert "mtp-head" in metadata["tags"] and "layout-eagle" in metadata["tags"]
    assert "| loss_type | tv |" in card and "| acceptance@1 | 0.61 |" in card


def test_push_to_hub_uploads_the_saved_folder(load_tiny, monkeypatch, tmp_path):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["created"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["weights"] = load_file(os.path.join(folder_path, "model.safetensors"))
            uploaded["card"] = Path(folder_path, "README.md").read_text(encoding="utf-8")
            uploaded["revision"] = kwargs.get("revision")
            return "commit"

    # The head's Hub upload is huggingface_hub's ModelHubMixin.
    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    head = MTPHead.from_model(load_tiny("llama"))
    assert head.push_to_hub("org/tiny-head", private=True, token="t", branch="dev") == "commit"
    assert uploaded["created"] == ("org/tiny-head", True, True) and uploaded["token"] == "t"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"] and uploaded["revision"] == "dev"
    assert uploaded["weights"].keys() == head.state_dict().keys()
    assert "library_name: bebop-trl" in uploaded["card"]  # the head's own card, not the mixin's template
    uploaded.clear()
    assert head.save_pretrained(tmp_path, push_to_hub=True, repo_id="org/tiny-head") == "commit"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]


def test_bound_head_shares_policy_embedding_and_lm_head(load_tiny, tokens):
    policy = load_tiny("qwen3")
    head = MTPHead.from_model(policy)
    assert head.lm_head_weight is policy.lm_head.weight
    before = head.embed(tokens).clone()
    with torch.no_grad():
        policy.model.embed_tokens.weight.add_(1.0)  # an optimizer step on the policy is seen at once
    torch.testing.assert_close(head.embed(tokens), before + 1.0)

    unbound = MTPHead(head.config)
    assert not unbound.is_bound
    with pytest.raises(RuntimeError, match=r"head.bind\(policy\)"):
        unbound(torch.zeros(1, 1, 64), tokens[:1, :1])


def test_native_import_export_round_trip_keeps_every_tensor(tmp_path, tokens):
    native = save_native_mtp_checkpoint(tmp_path / "qwen35")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen35").eval()
    head = MTPHead.from_native(tmp_path / "qwen35", policy=policy)
    assert head.config.layout == MTP_LAYOUT and head.config.num_layers == 1
    torch.testing.assert_close(head.fc.weight, native["mtp.fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(head.model.norm.weight, native["mtp.norm.weight"], rtol=0, atol=0)

    exported = load_file(head.save_native(tmp_path / "export"))
    assert exported.keys() == native.keys()
    for name, tensor in native.items():
        assert torch.equal(exported[name], tensor), name
    with torch.no_grad():
        logits = head.compute_logits(head(policy_hidden(policy, tokens)[:, :-1], tokens[:, 1:]).last_hidden_state)
    assert torch.isfinite(logits).all()


def test_native_import_rejects_checkpoints_without_mtp_weights(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="ships no MTP weights"):
        MTPHead.from_native(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match=r"no MTP weights \(no `mtp\.\*` tensors\)"):
        MTPHead.from_native(tiny_checkpoints["qwen3_5"])
    head = MTPHead.from_model(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="Only `mtp`-layout heads"):
        head.save_native(tmp_path)


def test_hidden_size_mismatch_names_both_sizes():
    head = MTPHead.from_model(tiny_causal_lm("llama", hidden_size=32))
    with pytest.raises(ValueError, match=r"hidden size 32 does not match the policy's hidden size 48"):
        head.bind(tiny_causal_lm("llama", hidden_size=48))


def test_vocab_architecture_and_base_model_mismatches(load_tiny, tmp_path):
    llama = load_tiny("llama")
    head = MTPHead.from_model(llama)
    with pytest.raises(ValueError, match=r"vocabulary size 128 does not match the policy's lm_head rows 256"):
        head.validate_policy(tiny_causal_lm("llama", vocab_size=256))
    with pytest.raises(
        ValueError, match=r"architecture 'llama' \(LlamaForCausalLM\) does not match the policy's 'qwen3'"
    ):
        head.validate_policy(load_tiny("qwen3"))

    other = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint(tmp_path / "another-llama", "llama", seed=1))
    with pytest.raises(ValueError, match="check_base_model=False"):
        head.bind(other)
    assert head.bind(other, check_base_model=False).is_bound


def test_base_model_name_matches_hub_id_and_local_folder(load_tiny):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy)
    head.config.base_model_name_or_path = "some-org/tiny-llama"  # the fixture folder is named tiny-llama
    head.validate_policy(policy)


def test_truncated_weights_file_gives_a_clear_error(load_tiny, tmp_path):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="corrupt or truncated"):
        MTPHead.from_pretrained(tmp_path)


def test_missing_files_and_foreign_checkpoints(load_tiny, tiny_checkpoints, tmp_path):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        MTPHead.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not an MTP head checkpoint \(model_type='llama'\).*from_native"):
        MTPHead.from_pretrained(tiny_checkpoints["llama"])


def test_weights_that_do_not_fit_the_config(load_tiny, tmp_path):
    MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "a")
    MTPHead.from_model(load_tiny("llama"), layout=MTP_LAYOUT).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"do not fit the head's config: .*unexpected \['model.layers.0.input_layernorm"
    ):
        MTPHead.from_pretrained(tmp_path / "a")


def test_config_validation():
    with pytest.raises(ValueError, match="Unknown MTP head layout 'medusa'"):
        MTPHeadConfig(layout="medusa")
    with pytest.raises(ValueError, match="at least one decoder layer"):
        MTPHeadConfig(num_layers=0)


def test_two_layer_head(load_tiny, tokens):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy, num_layers=2)
    assert len(head.model.layers) == 2
    # Layers copy the policy's last two layers in order; the eagle layout drops only the first input norm.
    torch.testing.assert_close(head.model.layers[1].mlp.up_proj.weight, policy.model.layers[-1].mlp.up_proj.weight)
    torch.testing.assert_close(head.model.layers[0].mlp.up_proj.weight, policy.model.layers[-2].mlp.up_proj.weight)
    assert "model.layers.1.input_layernorm.weight" in head.state_dict()


def test_hub_id_that_cannot_be_resolved_offline_gives_os_error():
    with pytest.raises(OSError, match="does-not-exist"):
        MTPHead.from_pretrained("some-org/does-not-exist")


def test_load_with_dtype_and_policy_device(load_tiny, tmp_path):
    policy = load_tiny("qwen2")
    MTPHead.from_model(policy).save_pretrained(tmp_path)
    head = MTPHead.from_pretrained(tmp_path, policy=policy, dtype=torch.bfloat16)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    assert head.fc.weight.device == policy.lm_head.weight.device


def test_bind_to_a_peft_wrapped_policy(load_tiny, tokens):
    from peft import LoraConfig, get_peft_model

    policy = load_tiny("llama")
    head = MTPHead.from_model(policy)
    peft_policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head.bind(peft_policy)
    assert head.lm_head_weight is policy.lm_head.weight
    with torch.no_grad():
        hidden = peft_policy(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        assert head.compute_logits(head(hidden[:, :-1], tokens[:, 1:]).last_hidden_state).shape == (2, 11, 128)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    from bebop_trl.embedded import default_cache_dir

    monkeypatch.setenv("BEBOP_TRL_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("BEBOP_TRL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "bebop_trl")
