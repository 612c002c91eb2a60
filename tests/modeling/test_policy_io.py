"""Loading only the part of a policy a head needs: embedding, lm_head, final norm and last decoder layers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bebop_trl import MTPHead
from bebop_trl.modeling.policy_io import load_policy_io
from bebop_trl.testing import tiny_causal_lm


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_the_loaded_parts_are_the_checkpoints_and_the_rest_stays_on_meta(tmp_path, sharded, tied):
    policy = tiny_causal_lm("llama", seed=3, tie_word_embeddings=tied, num_hidden_layers=3)
    policy.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    io = load_policy_io(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(io.get_input_embeddings().weight, full.get_input_embeddings().weight)
    assert torch.equal(io.get_output_embeddings().weight, full.get_output_embeddings().weight)
    assert (io.get_output_embeddings().weight is io.get_input_embeddings().weight) == tied
    for name, param in io.model.layers[2].named_parameters():
        assert torch.equal(param, full.model.layers[2].get_parameter(name)), name
    assert torch.equal(io.model.norm.weight, full.model.norm.weight)
    assert all(p.is_meta for p in io.model.layers[0].parameters())  # never allocated
    assert not any(p.requires_grad for p in io.parameters() if not p.is_meta)

    # A new head is the same built from either: it reads only these parts.
    torch.manual_seed(0)
    from_io = MTPHead.from_model(io).state_dict()
    torch.manual_seed(0)
    from_full = MTPHead.from_model(full).state_dict()
    assert from_io.keys() == from_full.keys() and all(torch.equal(from_io[k], from_full[k]) for k in from_io)


def test_a_checkpoint_without_a_needed_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_causal_lm("llama", tie_word_embeddings=False).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensor 'lm_head\.weight'"):
        load_policy_io(tmp_path)
