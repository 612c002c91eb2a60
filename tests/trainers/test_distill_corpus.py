"""Self-distilled corpora: records, hidden states, exclusion of evaluation prompts, resumption and settings checks."""

import os
import shutil

import pytest
import torch

from bebop_trl.modeling.teacher_forcing import final_hidden_states
from bebop_trl.rollout import torch_engine
from bebop_trl.trainers import distill_corpus
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
