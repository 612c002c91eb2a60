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
