"""Heads with a draft vocabulary: construction, logits, checkpoints, exactness, and choosing the vocabulary."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bebop_trl import MTPHead, MTPHeadConfig
from bebop_trl.modeling import MTP_LAYOUT, draft_vocab_mass, estimate_token_mass, select_draft_vocab
from bebop_trl.modeling.vllm_export import export_vllm, vllm_draft_weights, vllm_speculative_config
from bebop_trl.speculative import rejection_sample
from bebop_trl.testing import perturbed_head


DRAFT_VOCAB = list(range(0, 96, 2))  # 48 sorted ids of the tiny models' 128


def policy_hidden(policy, input_ids):
    return policy(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


@pytest.fixture
def tokens():
    torch.manual_seed(0)
    return torch.randint(4, 100, (2, 12))


def head_logits(head, policy, tokens):
    with torch.no_grad():
        return head.compute_logits(head(policy_hidden(policy, tokens)[:, :-1], tokens[:, 1:]).last_hidden_state)


@pytest.mark.parametrize("layout", ["eagle", MTP_LAYOUT])
def test_draft_head_has_its_own_frozen_rows_and_full_vocabulary_logits(load_tiny, tokens, layout):
    policy = load_tiny("llama")
    full = MTPHead.from_model(policy, layout=layout)
    head = MTPHead.from_model(policy, layout=layout, draft_vocab=DRAFT_VOCAB)
    ids = torch.tensor(DRAFT_VOCAB)
    assert head.config.draft_vocab_size == 48
    assert torch.equal(head.draft_vocab, ids)
    assert torch.equal(head.draft_lm_head_weight, policy.lm_head.weight[ids])
    assert head.draft_lm_head_weight.data_ptr() != policy.lm_head.weight.data_ptr()
    assert head.lm_head_weight is policy.lm_head.weight
    # Frozen: buffers, outside the head's parameters, so optimizers and requires_grad_(True) never reach them.
    assert not any(p is head.draft_lm_head_weight for p in head.parameters())
    head.requires_grad_(True)
    assert not head.draft_lm_head_weight.requires_grad

    logits = head_logits(head, policy, tokens)
    assert logits.shape == (2, 11, 128)
    outside = torch.ones(128, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(logits[..., outside]).all()
    # Same init, same rows: the draft logits are the full head's on D, and q is exactly 0 elsewhere.
    torch.testing.assert_close(logits[..., ids], head_logits(full, policy, tokens)[..., ids])
    q = logits.softmax(-1)
    assert (q[..., outside] == 0).all() and torch.allclose(q.sum(-1), torch.ones(2, 11))
    with torch.no_grad():
        hidden = head(policy_hidden(policy, tokens)[:, :-1], tokens[:, 1:]).last_hidden_state
        torch.testing.assert_close(head.compute_draft_logits(hidden), logits[..., ids])
    assert full.draft_vocab is None and full.draft_lm_head_weight is None


def test_noise_on_the_parameters_leaves_the_draft_rows_alone(load_tiny):
    policy = load_tiny("llama")
    head = perturbed_head(policy, scale=0.1)
    draft = MTPHead.from_model(policy, draft_vocab=DRAFT_VOCAB)
    rows = draft.draft_lm_head_weight.clone()
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(0.1)
    assert torch.equal(draft.draft_lm_head_weight, rows)
    assert head.draft_vocab is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_keeps_rows_and_mapping(load_tiny, tmp_path, tokens, dtype):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy, draft_vocab=torch.tensor(DRAFT_VOCAB)).to(dtype)
    with torch.no_grad():
        head.draft_lm_head_weight.add_(0.01)  # no longer the policy's rows: they must come from the file
    head.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["draft_vocab"].dtype == torch.long and stored["draft_vocab"].tolist() == DRAFT_VOCAB
    assert stored["draft_lm_head_weight"].shape == (48, 64)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 48
    assert "| draft vocabulary | 48 tokens |" in (tmp_path / "README.md").read_text()

    loaded = MTPHead.from_pretrained(tmp_path, policy=policy)
    assert loaded.fc.weight.dtype == dtype and loaded.draft_vocab.dtype == torch.long
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(head_logits(head, policy, tokens), head_logits(loaded, policy, tokens))


def test_a_new_head_from_the_config_takes_the_state_dict(load_tiny, tokens):
    # As the asynchronous rollout worker copies a head: MTPHead(config) then load_state_dict.
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy, draft_vocab=DRAFT_VOCAB)
    copy = MTPHead(head.config)
    copy.load_state_dict(head.state_dict())
    copy.bind(policy)
    assert torch.equal(head_logits(head, policy, tokens), head_logits(copy, policy, tokens))


def test_restricting_a_trained_head_renormalises_its_distribution_over_the_subset(load_tiny, tokens):
    policy = load_tiny("llama")
    full = perturbed_head(policy, scale=0.1, num_layers=2)
    restricted = full.with_draft_vocab(DRAFT_VOCAB)
    assert restricted.config.draft_vocab_size == 48 and full.config.draft_vocab_size is None
    assert restricted.draft_vocab.tolist() == DRAFT_VOCAB and restricted.training == full.training
    torch.testing.assert_close(restricted.draft_lm_head_weight, policy.lm_head.weight[DRAFT_VOCAB], rtol=0, atol=0)
    q_full = head_logits(full, policy, tokens).softmax(-1)
    q_restricted = head_logits(restricted, policy, tokens).softmax(-1)
    outside = torch.ones(128, dtype=torch.bool)
    outside[DRAFT_VOCAB] = False
    assert (q_restricted[..., outside] == 0).all()
    expected = q_full[..., DRAFT_VOCAB] / q_full[..., DRAFT_VOCAB].sum(-1, keepdim=True)
    torch.testing.assert_close(q_restricted[..., DRAFT_VOCAB], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already drafts from a 48-token draft vocabulary"):
        restricted.with_draft_vocab(DRAFT_VOCAB[:10])


@pytest.mark.parametrize(
    ("draft_vocab", "message"),
    [
        ([3, 1, 2], "must be sorted with each id once: pass torch.unique"),
        ([1, 1, 2], "must be sorted with each id once"),
        ([1, 2, 128], r"outside the policy's vocabulary \[0, 128\) \(e.g. 128\)"),
        ([-1, 2], r"outside the policy's vocabulary \[0, 128\) \(e.g. -1\)"),
        ([], "empty"),
        ([[1, 2]], "1-D list or tensor of integer token ids"),
        (torch.tensor([1.0, 2.0]), "1-D list or tensor of integer token ids"),
    ],
)
def test_invalid_draft_vocabulary_is_refused(load_tiny, draft_vocab, message):
    with pytest.raises(ValueError, match=message):
        MTPHead.from_model(load_tiny("llama"), draft_vocab=draft_vocab)


def test_draft_vocab_size_alone_is_refused(load_tiny):
    with pytest.raises(ValueError, match="Pass the draft vocabulary itself as draft_vocab=ids"):
        MTPHead.from_model(load_tiny("llama"), draft_vocab_size=48)
    with pytest.raises(ValueError, match=r"draft_vocab_size must be None .* in \[1, vocab_size=128\], got 200"):
        MTPHeadConfig(vocab_size=128, draft_vocab_size=200)


def test_loading_checks_the_mapping(load_tiny, tmp_path):
    policy = load_tiny("llama")
    MTPHead.from_model(policy, draft_vocab=DRAFT_VOCAB).save_pretrained(tmp_path / "draft")
    MTPHead.from_model(policy).save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "draft" / "model.safetensors")

    save_file(
        {k: v for k, v in weights.items() if not k.startswith("draft_")}, tmp_path / "draft" / "model.safetensors"
    )
    with pytest.raises(ValueError, match="have no draft vocabulary, but its config says draft_vocab_size=48"):
        MTPHead.from_pretrained(tmp_path / "draft")

    save_file(weights, tmp_path / "full" / "model.safetensors")
    with pytest.raises(ValueError, match="have a draft vocabulary of 48 tokens, but its config has no draft_vocab"):
        MTPHead.from_pretrained(tmp_path / "full")

    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    (tmp_path / "draft" / "config.json").write_text(json.dumps({**config, "draft_vocab_size": 40}))
    save_file(weights, tmp_path / "draft" / "model.safetensors")
    with pytest.raises(ValueError, match=r"48 tokens, but its config says draft_vocab_size=40.*Save the head again"):
        MTPHead.from_pretrained(tmp_path / "draft")

    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    save_file({**weights, "draft_vocab": weights["draft_vocab"].flip(0)}, tmp_path / "draft" / "model.safetensors")
    with pytest.raises(ValueError, match=r"draft_vocab of .* must be sorted"):
        MTPHead.from_pretrained(tmp_path / "draft")

    shifted = weights["draft_vocab"] + 100
    save_file({**weights, "draft_vocab": shifted}, tmp_path / "draft" / "model.safetensors")
    with pytest.raises(ValueError, match=r"outside the policy's vocabulary \[0, 128\).*Choose it again"):
        MTPHead.from_pretrained(tmp_path / "draft")


def test_rejection_sampling_with_a_draft_vocabulary_is_exact():
    # q from logits that are -inf outside D: the output must still be distributed as p, mass outside D included.
    generator = torch.Generator().manual_seed(0)
    vocab, draws = 12, 200_000
    p = torch.softmax(torch.randn(vocab, generator=generator), 0)
    draft_vocab = torch.tensor([0, 2, 3, 7, 9])
    logits = torch.full((vocab,), float("-inf"))
    logits[draft_vocab] = torch.randn(len(draft_vocab), generator=generator)
    q = torch.softmax(logits, 0)
    drafts = torch.multinomial(q, draws, replacement=True, generator=generator)
    tokens, accepted = rejection_sample(
        drafts[:, None], q.expand(draws, 1, vocab), p.expand(draws, 2, vocab), generator=generator
    )
    frequencies = torch.bincount(tokens[:, 0], minlength=vocab).double() / draws
    assert (frequencies - p.double()).abs().max() < 4 * (0.25 / draws) ** 0.5
    expected_acceptance = torch.minimum(p, q).sum()
    assert abs(accepted.double().mean() - expected_acceptance) < 0.01
    assert expected_acceptance <= p[draft_vocab].sum()


def test_eagle_export_carries_the_draft_vocabulary_in_vllms_form(load_tiny, tmp_path):
    policy = load_tiny("llama")
    head = perturbed_head(policy, scale=0.1, draft_vocab=DRAFT_VOCAB)
    folder = export_vllm(head, tmp_path / "vllm")

    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # A name starting with "Eagle" is kept by vLLM as is: the plugin's drafter with a draft vocabulary.
    assert config["architectures"] == ["EagleDraftVocabLlamaForCausalLM"]
    assert config["draft_vocab_size"] == 48 and config["vocab_size"] == 128 and config["tie_word_embeddings"] is False
    weights = load_file(f"{folder}/model.safetensors")
    assert not {"draft_vocab", "draft_lm_head_weight"} & weights.keys()
    # vLLM's convention: target id = j + d2t[j].
    assert (weights["d2t"] + torch.arange(48)).tolist() == DRAFT_VOCAB
    torch.testing.assert_close(weights["lm_head.weight"], head.draft_lm_head_weight, rtol=0, atol=0)
    torch.testing.assert_close(weights["fc.weight"], head.state_dict()["fc.weight"], rtol=0, atol=0)
    assert vllm_draft_weights(head).keys() == weights.keys()
    assert vllm_speculative_config(head.config, folder, num_speculative_tokens=3)["method"] == "eagle"


def test_mtp_exports_refuse_a_draft_vocabulary(load_tiny, tmp_path):
    head = MTPHead.from_model(load_tiny("qwen3_5"), layout=MTP_LAYOUT, draft_vocab=DRAFT_VOCAB)
    message = "48-token draft vocabulary, which vLLM's MTP drafters cannot run"
    with pytest.raises(ValueError, match=message):
        export_vllm(head, tmp_path / "vllm", target_config=head.config)
    assert not (tmp_path / "vllm").exists()
    with pytest.raises(ValueError, match=message):
        vllm_draft_weights(head)
    with pytest.raises(ValueError, match=message):
        vllm_speculative_config(head.config, tmp_path, num_speculative_tokens=3)
    with pytest.raises(ValueError, match="has no native form"):
        head.save_native(tmp_path / "native")


# ------------------------------------------------------------------------------------------- choosing the vocabulary


SEQUENCES = [[5, 5, 5, 7, 7, 1], [5, 9, 7, 1], [2, 5]]  # counts: 5 x5, 7 x3, 1 x2, 9 x1, 2 x1 (12 tokens)


def test_token_mass_from_counts_and_from_probabilities():
    mass = estimate_token_mass(10, sequences=SEQUENCES)
    assert mass.dtype == torch.float64 and torch.isclose(mass.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert mass[5] == 5 / 12 and mass[7] == 3 / 12 and mass[0] == 0
    probs = torch.softmax(torch.randn(3, 4, 10), -1)
    torch.testing.assert_close(estimate_token_mass(10, probs=probs), probs.double().mean(dim=(0, 1)))
    torch.testing.assert_close(estimate_token_mass(10, probs=[probs[0], probs[1:]]), probs.double().mean((0, 1)))
    with pytest.raises(ValueError, match="exactly one of sequences"):
        estimate_token_mass(10)
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 10\)"):
        estimate_token_mass(10, sequences=[[1, 10]])
    with pytest.raises(ValueError, match="no token"):
        estimate_token_mass(10, sequences=[[]])


def test_select_by_size_and_by_mass():
    assert select_draft_vocab(10, sequences=SEQUENCES, size=2).tolist() == [5, 7]
    # Ties by id: 1 (x2), then 2 and 9 (x1 each) in id order.
    assert select_draft_vocab(10, sequences=SEQUENCES, size=4).tolist() == [1, 2, 5, 7]
    # Always-included ids come first, whatever their mass.
    assert select_draft_vocab(10, sequences=SEQUENCES, size=3, always_include=[0]).tolist() == [0, 5, 7]
    assert select_draft_vocab(10, sequences=SEQUENCES, mass=8 / 12).tolist() == [5, 7]
    assert select_draft_vocab(10, sequences=SEQUENCES, mass=0.7).tolist() == [1, 5, 7]
    assert select_draft_vocab(10, sequences=SEQUENCES, mass=1.0).tolist() == [1, 2, 5, 7, 9]
    assert select_draft_vocab(10, sequences=SEQUENCES, mass=0.1, always_include=[0, 3]).tolist() == [0, 3, 5]
    for bad, message in (
        ({"size": 2, "mass": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"size": 11}, r"size must lie in"),
        ({"size": 1, "always_include": [0, 1]}, "size must lie in"),
        ({"mass": 1.5}, r"mass must lie in \(0, 1\]"),
        ({"size": 2, "always_include": [10]}, "always_include holds ids outside"),
    ):
        with pytest.raises(ValueError, match=message):
            select_draft_vocab(10, sequences=SEQUENCES, **bad)


def test_covered_mass():
    assert draft_vocab_mass([5, 7], 10, sequences=SEQUENCES) == pytest.approx(8 / 12)
    assert draft_vocab_mass(torch.tensor([5, 7, 1, 2, 9]), 10, sequences=SEQUENCES) == pytest.approx(1.0)
    assert draft_vocab_mass([0, 3], 10, sequences=SEQUENCES) == 0
