import os
from pathlib import Path

import pytest
import torch

from bebop_trl import MTPHead


@pytest.mark.slow
def test_smollm2_loads_offline_and_drafts(tmp_path):
    from bebop_trl.embedded import SMOLLM2_REPO_ID, load_smollm2

    model, tokenizer = load_smollm2()
    assert model.config.name_or_path == SMOLLM2_REPO_ID
    assert (model.config.hidden_size, model.config.vocab_size, model.config.num_hidden_layers) == (576, 49152, 30)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids.shape[1] :])

    head = MTPHead.from_model(model)
    head.save_pretrained(tmp_path)
    reloaded = MTPHead.from_pretrained(tmp_path, policy=model)
    assert reloaded.config.base_model_name_or_path == SMOLLM2_REPO_ID
    hidden = model(ids, output_hidden_states=True).hidden_states[-1][:, :-1]
    with torch.no_grad():
        logits = reloaded.compute_logits(reloaded(hidden, ids[:, 1:]).last_hidden_state)
    assert logits.shape == (1, ids.shape[1] - 1, 49152)


def test_shipped_head_is_a_small_bf16_adapter_for_smollm2(tmp_path):
    from bebop_trl.embedded import SMOLLM2_HEAD_DIR, SMOLLM2_REPO_ID

    head = MTPHead.from_pretrained(SMOLLM2_HEAD_DIR)
    config = head.config
    assert (config.base_model_name_or_path, config.base_architecture) == (SMOLLM2_REPO_ID, "LlamaForCausalLM")
    assert (config.hidden_size, config.vocab_size, config.layout) == (576, 49152, "eagle3")
    assert config.draft_vocab_size == 1024 and head.aux_layers == (2, 15, 27)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in head.parameters())
    # bf16: 5.1M parameters and the 1024 frozen lm_head rows of the draft vocabulary (10.8 MiB).
    assert os.path.getsize(os.path.join(SMOLLM2_HEAD_DIR, "model.safetensors")) < 11 * 2**20
    card = Path(SMOLLM2_HEAD_DIR, "README.md").read_text(encoding="utf-8")
    assert "## Training recipe" in card and "## Measured" in card and "Q4_1 GGUF" in card
    # It is the vLLM drafter of the embedded model as it is.
    head.export_vllm(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")


@pytest.mark.slow
def test_shipped_head_binds_to_the_embedded_model():
    from bebop_trl.embedded import load_smollm2, load_smollm2_head

    policy, _ = load_smollm2()
    head = load_smollm2_head(policy)
    assert head.is_bound and next(head.parameters()).dtype == policy.dtype
