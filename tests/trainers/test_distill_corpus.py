"""Self-distilled corpora: records, hidden states, exclusion of evaluation prompts, resumption and settings checks."""

import os
import shutil

import pytest
import torch

from bebop_trl import MTPConfig, MTPHead, MTPTrainer
from bebop_trl.modeling.teacher_forcing import final_hidden_states
from bebop_trl.rollout import torch_engine
from bebop_trl.testing import tiny_causal_lm
from bebop_trl.trainers import distill_corpus, head_loss
from bebop_trl.trainers.distill_corpus import (
    build_distill_corpus,
    corpus_settings,
    hidden_states_of,
    load_distill_corpus,
)


PROMPTS = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19], [20, 21]]
EVALUATION = [[14], [99, 98]]  # the first is a training prompt too: it must be dropped
SETTINGS = dict(samples_per_prompt=2, max_new_tokens=6, batch_size=4, shard_size=5, seed=3)


@pytest.fixture
def policy(load_tiny):
    return load_tiny("llama")


def build(policy, tokenizer, folder, **overrides):
    return build_distill_corpus(
        policy, tokenizer, PROMPTS, folder, exclude_prompts=EVALUATION, **(SETTINGS | overrides)
    )


def test_records_hold_the_completions_and_the_policys_hidden_states(policy, tiny_tokenizer, tmp_path):
    corpus = build(policy, tiny_tokenizer, tmp_path / "corpus")
    distinct = [p for p in dict.fromkeys(map(tuple, PROMPTS)) if list(p) != [14]]
    assert len(corpus) == 2 * len(distinct) == 12  # duplicates merged, the evaluation prompt dropped
    settings = corpus_settings(tmp_path / "corpus")
    assert settings.num_shards == 3 and settings.num_prompts == 6 and settings.hidden_size == policy.config.hidden_size
    rows = corpus.with_format("torch")
    for index in range(len(corpus)):
        record = rows[index]
        ids, prompt_length = record["input_ids"].tolist(), int(record["prompt_length"])
        assert tuple(ids[:prompt_length]) == distinct[index // 2]
        assert 1 <= len(ids) - prompt_length <= 6
        # The hidden states are the policy's final hidden states over prompt + completion, in bf16.
        with torch.no_grad():
            expected = final_hidden_states(policy, torch.tensor([ids]))[0]
        stored = hidden_states_of(record["hidden_states"])
        assert stored.dtype == torch.bfloat16 and stored.shape == (len(ids), policy.config.hidden_size)
        torch.testing.assert_close(stored.float(), expected, atol=0.02, rtol=0.01)
        torch.testing.assert_close(stored, expected.to(torch.bfloat16), atol=1e-2, rtol=0)


def test_aux_layers_store_the_hidden_states_entering_those_layers(policy, tiny_tokenizer, tmp_path):
    layers = (0, 1)  # the embeddings, then the output of the first decoder layer
    corpus = build(policy, tiny_tokenizer, tmp_path / "corpus", aux_layers=layers)
    assert corpus_settings(tmp_path / "corpus").aux_layers == layers
    record = corpus.with_format("torch")[3]
    ids = record["input_ids"].tolist()
    with torch.no_grad():
        out = policy(torch.tensor([ids]), output_hidden_states=True)
    # transformers' hidden_states[L] is the input of decoder layer L, which vLLM's aux hidden states also are.
    expected = torch.cat([out.hidden_states[layer][0] for layer in layers], dim=-1)
    stored = hidden_states_of(record["aux_hidden_states"])
    assert stored.shape == (len(ids), len(layers) * policy.config.hidden_size)
    torch.testing.assert_close(stored.float(), expected, atol=0.02, rtol=0.01)
    batch = distill_corpus.CorpusCollator(pad_token_id=0)(
        [distill_corpus.prepare_corpus(corpus, policy.config.hidden_size)[i] for i in range(3)]
    )
    assert batch["aux_hidden_states"].shape[-1] == len(layers) * policy.config.hidden_size


def test_aux_layers_out_of_range_are_refused(policy, tiny_tokenizer, tmp_path):
    for bad in ((policy.config.num_hidden_layers,), (1, 0)):
        with pytest.raises(
            ValueError, match=r"aux_layers must be increasing layer indices >= 0 and < 2 of the policy"
        ):
            build(policy, tiny_tokenizer, tmp_path / "corpus", aux_layers=bad)


def test_an_interrupted_build_resumes_at_its_first_missing_shard(policy, tiny_tokenizer, tmp_path, monkeypatch):
    complete = build(policy, tiny_tokenizer, tmp_path / "complete")

    generate, calls = torch_engine.generate_from_ids, []

    def failing_after_two_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(distill_corpus, "generate_from_ids", failing_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        build(policy, tiny_tokenizer, tmp_path / "resumed")
    assert os.listdir(tmp_path / "resumed" / "shards") == ["00000"]  # the unfinished shard left nothing
    with pytest.raises(ValueError, match="unfinished: 2 of 3 shards are missing"):
        load_distill_corpus(tmp_path / "resumed")

    monkeypatch.setattr(distill_corpus, "generate_from_ids", generate)
    calls.clear()
    resumed = build(policy, tiny_tokenizer, tmp_path / "resumed")
    assert resumed["input_ids"] == complete["input_ids"]  # shard i always samples with seed + i
    assert resumed["hidden_states"] == complete["hidden_states"]

    shutil.rmtree(tmp_path / "resumed" / "shards" / "00001")  # a lost shard is sampled again, the same
    assert build(policy, tiny_tokenizer, tmp_path / "resumed")["input_ids"] == complete["input_ids"]


def test_other_settings_in_the_same_folder_are_refused(policy, tiny_tokenizer, tmp_path):
    build(policy, tiny_tokenizer, tmp_path / "corpus")
    with pytest.raises(ValueError, match=r"other settings .*'temperature': \(1.0, 0.7\)"):
        build(policy, tiny_tokenizer, tmp_path / "corpus", temperature=0.7)
    with pytest.raises(ValueError, match="holds no self-distilled corpus"):
        load_distill_corpus(tmp_path)
    with pytest.raises(ValueError, match="No prompt left to sample"):
        build_distill_corpus(policy, tiny_tokenizer, [[14]], tmp_path / "empty", exclude_prompts=[[14]])


# ------------------------------------------------------------------------------------------ training on a corpus


def test_a_head_trains_on_a_corpus_without_running_the_policy(policy, tiny_tokenizer, tmp_path, monkeypatch):
    prompts = [tiny_tokenizer(f"{a}+{b}=")["input_ids"] for a in range(8) for b in range(8)]
    corpus = build_distill_corpus(
        policy, tiny_tokenizer, prompts, tmp_path / "corpus", samples_per_prompt=2, max_new_tokens=12, batch_size=32
    )
    args = MTPConfig(
        output_dir=str(tmp_path / "head"), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
        num_mtp_steps=3, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=4, max_length=10,
    )  # fmt: skip
    trainer = MTPTrainer(policy, args, corpus, processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["hidden_states"].dtype == torch.bfloat16 and batch["input_ids"].shape[1] <= 10

    # The corpus's loss is the loss of the policy's own hidden states, rounded to bf16 as the corpus stores them.
    module = trainer.model
    with torch.no_grad():
        from_corpus = module(
            batch["input_ids"], batch["attention_mask"], batch["prompt_length"], None, batch["hidden_states"]
        )
        hidden = final_hidden_states(policy, batch["input_ids"], batch["attention_mask"]).to(torch.bfloat16)
        expected = module(batch["input_ids"], batch["attention_mask"], batch["prompt_length"], None, hidden)
    torch.testing.assert_close(from_corpus.loss, expected.loss, atol=1e-6, rtol=0)

    def no_policy_forward(*args, **kwargs):
        raise AssertionError("training on a corpus ran the policy")

    monkeypatch.setattr(policy.model, "forward", no_policy_forward)
    trainer.train()
    acceptance = [entry["acceptance/step_1"] for entry in trainer.state.log_history if "acceptance/step_1" in entry]
    assert len(acceptance) == 3 and acceptance[-1] > acceptance[0], acceptance


def test_a_stored_log_normalizer_spares_draft_vocabulary_training_the_policys_vocabulary(
    policy, tiny_tokenizer, tmp_path, monkeypatch
):
    corpus = build(policy, tiny_tokenizer, tmp_path / "corpus", log_normalizer=True)
    assert corpus_settings(tmp_path / "corpus").log_normalizer
    record = corpus.with_format("torch")[0]
    hidden = hidden_states_of(record["hidden_states"]).float()
    # The log-sum-exp of the policy's logits from the stored (bf16) hidden states, at every position.
    expected = torch.logsumexp(hidden @ policy.lm_head.weight.T, dim=-1)
    torch.testing.assert_close(record["policy_log_normalizer"], expected, atol=1e-5, rtol=0)

    draft_vocab = list(range(0, policy.config.vocab_size, 3))
    head = MTPHead.from_model(policy, draft_vocab=draft_vocab)
    args = MTPConfig(
        output_dir=str(tmp_path / "head"), max_steps=1, per_device_train_batch_size=4, num_mtp_steps=3,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = MTPTrainer(policy, args, corpus, processing_class=tiny_tokenizer, head=head)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["policy_log_normalizer"].dtype == torch.float32
    assert batch["policy_log_normalizer"].shape == batch["input_ids"].shape
    inputs = [batch[name] for name in ("input_ids", "attention_mask", "prompt_length")]
    with torch.no_grad():
        computed = trainer.model(*inputs, None, batch["hidden_states"])

    def no_sweep(*args, **kwargs):
        raise AssertionError("the policy's normaliser was computed again")

    monkeypatch.setattr(head_loss, "log_normalizer", no_sweep)
    with torch.no_grad():
        stored = trainer.model(
            *inputs, None, batch["hidden_states"], policy_log_normalizer=batch["policy_log_normalizer"]
        )
    torch.testing.assert_close(stored.loss, computed.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored.acceptance, computed.acceptance, atol=1e-5, rtol=0)
    trainer.train()  # the collated column reaches the module


def test_a_corpus_of_another_policy_is_refused(policy, load_tiny, tiny_tokenizer, tmp_path):
    corpus = build(policy, tiny_tokenizer, tmp_path / "corpus")
    other = tiny_causal_lm("llama", seed=0, hidden_size=48)
    with pytest.raises(ValueError, match="hidden states of width 64, but the policy's hidden size is 48"):
        MTPTrainer(
            other,
            MTPConfig(str(tmp_path / "out"), report_to="none", use_cpu=True),
            corpus,
            processing_class=tiny_tokenizer,
        )


def test_a_trainer_given_the_policys_name_loads_only_what_the_head_needs(policy, tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    corpus = build(policy, tokenizer, tmp_path / "corpus")
    args = MTPConfig(
        str(tmp_path / "head"), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = MTPTrainer(tiny_checkpoints["llama"], args, corpus, processing_class=tokenizer)
    assert all(p.is_meta for p in trainer.policy.model.layers[0].parameters())
    trainer.train()
    with pytest.raises(ValueError, match="loaded only the policy's embedding, lm_head and last layers"):
        trainer.measure_acceptance(corpus)
