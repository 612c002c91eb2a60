"""The EAGLE-3 layout: a head that fuses hidden states from several policy layers, with a wide first layer."""

import pytest
import torch

from bebop_trl import MTPConfig, MTPHead, MTPHeadConfig, MTPTrainer
from bebop_trl.modeling import EAGLE3_LAYOUT, eagle3_aux_layers
from bebop_trl.modeling.modeling_mtp_head import Eagle3InputLayer
from bebop_trl.modeling.teacher_forcing import policy_hidden_states, unroll_teacher_forced
from bebop_trl.trainers.distill_corpus import build_distill_corpus

from .test_teacher_forcing import engine_drafts


AUX = [0, 1]  # the tiny models have two layers: the embeddings, and the first layer's output


def perturbed(head: MTPHead, scale: float = 0.05) -> MTPHead:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return head


@pytest.fixture
def policy(load_tiny):
    return load_tiny("llama")


def test_default_aux_layers_are_vllms():
    assert eagle3_aux_layers(30) == (2, 15, 27)
    assert eagle3_aux_layers(32) == (2, 16, 29)


def test_structure_and_names(policy):
    head = MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=AUX)
    hidden = policy.config.hidden_size
    state = head.state_dict()
    assert state["fc.weight"].shape == (hidden, 2 * hidden)
    assert isinstance(head.model.layers[0], Eagle3InputLayer)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert state[f"model.layers.0.layer.self_attn.{name}.weight"].shape[1] == 2 * hidden
    assert "model.layers.0.hidden_norm.weight" in state and "norm.weight" in state
    assert "model.norm.weight" not in state  # the final norm sits before the lm_head, outside the decoder
    assert head.aux_layers == tuple(AUX)


@torch.no_grad()
def test_a_new_head_drafts_the_policys_logit_lens_at_its_highest_layer(load_tiny):
    policy = load_tiny("qwen3")
    head = MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=[0, 1])
    ids = torch.randint(4, 100, (2, 9))
    final, aux = policy_hidden_states(policy, ids, aux_layers=head.aux_layers)
    step_input = head.policy_input(final, aux)
    # fc passes the highest fused layer through, and the layer's residual branches start at zero.
    torch.testing.assert_close(step_input, aux[..., -policy.config.hidden_size :])
    out = head(step_input, ids)
    torch.testing.assert_close(out.last_hidden_state, step_input)
    # The lm_head reads it through a copy of the policy's final norm.
    expected = policy.lm_head(policy.model.norm(step_input))
    torch.testing.assert_close(head.compute_logits(out.last_hidden_state), expected)
    # The wide projections hold the policy layer's weights in their hidden-state half.
    source = policy.model.layers[-1].self_attn.q_proj.weight
    wide = head.model.layers[0].layer.self_attn.q_proj.weight
    torch.testing.assert_close(wide[:, policy.config.hidden_size :], source)
    assert wide[:, : policy.config.hidden_size].abs().sum() == 0


@torch.no_grad()
def test_cached_drafting_matches_parallel_teacher_forcing(policy):
    head = perturbed(MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=AUX))
    ids = torch.randint(4, 100, (2, 10))
    hidden = head.policy_input(*policy_hidden_states(policy, ids, aux_layers=head.aux_layers))[:, :-1]
    parallel = head(hidden, ids[:, 1:]).last_hidden_state
    cache, steps = head.new_cache(), []
    for t in range(hidden.shape[1]):
        out = head(hidden[:, t : t + 1], ids[:, t + 1 : t + 2], past_key_values=cache, use_cache=True)
        steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_teacher_forced_slots_are_what_the_engine_drafts(policy):
    head = perturbed(MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=AUX))
    ids = torch.randint(4, 100, (2, 8))
    final, aux = policy_hidden_states(policy, ids, aux_layers=head.aux_layers)
    out = unroll_teacher_forced(head, ids, final, num_steps=3, aux_hidden=aux)
    step_input = head.policy_input(final, aux)
    starts = ids.shape[1] - 1
    for t in range(starts):
        drafts = engine_drafts(head, ids, step_input, t, num_steps=3)
        for j, draft in enumerate(drafts, start=1):
            for b in range(2):
                # The loss reads the drafts as the lm_head does, after the final norm; the targets stay final.
                torch.testing.assert_close(out.draft_hidden[j - 1, b * starts + t], head.output_norm(draft[b]),
                                           rtol=1e-4, atol=1e-5)  # fmt: skip
                torch.testing.assert_close(out.target_hidden[j - 1, b * starts + t], final[b, t + j])


def test_save_load_is_bit_exact(policy, tmp_path):
    head = perturbed(
        MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=AUX, draft_vocab=list(range(0, 90, 3)))
    )
    head.save_pretrained(tmp_path / "head")
    loaded = MTPHead.from_pretrained(tmp_path / "head", policy=policy)
    assert loaded.config.layout == EAGLE3_LAYOUT and loaded.aux_layers == tuple(AUX)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_bad_configurations_raise(policy):
    with pytest.raises(ValueError, match="must be given for the eagle3 layout and only for it"):
        MTPHeadConfig(layout="eagle", aux_layers=[1])
    with pytest.raises(ValueError, match="must be given for the eagle3 layout and only for it"):
        MTPHeadConfig(layout="eagle3")
    for bad in ([-1, 1], [1, 0], [1, 1]):
        with pytest.raises(ValueError, match="aux_layers must be increasing layer indices >= 0"):
            MTPHeadConfig(layout="eagle3", aux_layers=bad)
    with pytest.raises(ValueError, match=r"reads the policy's layers \[0, 5\], but the policy has 2 layers"):
        MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=[0, 5])
    with pytest.raises(ValueError, match="head_aux_layers is for head_layout='eagle3', got head_layout='eagle'"):
        MTPConfig("unused", head_layout="eagle", head_aux_layers=[0, 1])
    head = MTPHead.from_model(policy, layout=EAGLE3_LAYOUT, aux_layers=AUX)
    final = torch.zeros(1, 3, policy.config.hidden_size)
    with pytest.raises(ValueError, match="An eagle3 head reads the hidden states entering"):
        head.policy_input(final)


def test_trains_on_a_corpus_that_stores_its_layers(policy, tiny_tokenizer, tmp_path):
    prompts = [tiny_tokenizer(f"{a}+{b}=")["input_ids"] for a in range(6) for b in range(6)]
    settings = dict(samples_per_prompt=2, max_new_tokens=10, batch_size=36)
    with_layers = build_distill_corpus(policy, tiny_tokenizer, prompts, tmp_path / "aux", aux_layers=AUX, **settings)
    args = MTPConfig(
        output_dir=str(tmp_path / "head"), max_steps=9, per_device_train_batch_size=8, learning_rate=3e-3,
        num_mtp_steps=2, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=3, head_layout="eagle3", head_aux_layers=AUX,
    )  # fmt: skip
    trainer = MTPTrainer(policy, args, with_layers, processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    # The corpus's loss is the loss of the policy's own layers, rounded to bf16 as the corpus stores them.
    with torch.no_grad():
        from_corpus = trainer.model(batch["input_ids"], batch["attention_mask"], batch["prompt_length"], None,
                                    batch["hidden_states"], batch["aux_hidden_states"])  # fmt: skip
        final, aux = policy_hidden_states(policy, batch["input_ids"], batch["attention_mask"], AUX)
        expected = trainer.model(batch["input_ids"], batch["attention_mask"], batch["prompt_length"], None,
                                 final.bfloat16(), aux.bfloat16())  # fmt: skip
    torch.testing.assert_close(from_corpus.loss, expected.loss, atol=1e-6, rtol=0)
    trainer.train()
    acceptance = [e["acceptance/step_1"] for e in trainer.state.log_history if "acceptance/step_1" in e]
    assert len(acceptance) == 3 and acceptance[-1] > acceptance[0], acceptance

    final_only = build_distill_corpus(policy, tiny_tokenizer, prompts, tmp_path / "final", **settings)
    trainer = MTPTrainer(policy, args, final_only, processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="the corpus stores only the final hidden states"):
        trainer.train()
