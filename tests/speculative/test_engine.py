"""The engine against Hugging Face `generate`, an uncached recomputation of the head, and analytic acceptance."""

import pytest
import torch

from bebop_trl.modeling import MTPHead
from bebop_trl.rollout import left_pad
from bebop_trl.speculative import SpeculativeGenerator, engine, probs_from_logits
from bebop_trl.speculative.draft_length import AUTO_MAX_DRAFT_TOKENS, AdaptiveDraftLength, StepCosts
from bebop_trl.testing import char_tokenizer, tiny_causal_lm

from .helpers import binomial_z, perturbed_head, uncached_draft_probs


PROMPTS = ["hello there", "a", "What is the answer to it all?", "2+2="]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def policy():
    return tiny_causal_lm("llama", seed=0)


@pytest.fixture(scope="module")
def head(policy):
    return perturbed_head(policy, scale=0.02)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def greedy_references(prompts):
    """Per architecture: a tiny policy and its `generate(do_sample=False)` completions of `prompts`."""
    references = {}
    for architecture in ("llama", "qwen2", "qwen3"):
        policy = tiny_causal_lm(architecture, seed=0)
        output = policy.generate(**prompts, do_sample=False, max_new_tokens=40)
        references[architecture] = policy, output[:, prompts.input_ids.shape[1] :]
    return references


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_temperature_zero_matches_transformers_greedy(tokenizer, prompts, greedy_references, architecture, k):
    policy, expected = greedy_references[architecture]
    is_eos = expected == tokenizer.eos_token_id
    assert is_eos.any(dim=-1).sum() >= 1, "some rows must end at EOS"

    head = None if k is None else MTPHead.from_model(policy)
    out = SpeculativeGenerator(policy, head, num_speculative_tokens=k or 3).generate(
        prompts.input_ids, prompts.attention_mask, max_new_tokens=40, temperature=0.0
    )
    assert torch.equal(out.completion_ids, expected)
    ends = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, expected.shape[1])
    assert torch.equal(out.completion_lengths, ends)
    assert torch.equal(out.logprobs, torch.zeros_like(out.logprobs))


def test_logprobs_match_a_single_forward(policy, head, prompts):
    sampling = dict(temperature=0.7, top_k=20, top_p=0.9)
    out = SpeculativeGenerator(policy, head, num_speculative_tokens=2).generate(
        prompts.input_ids,
        prompts.attention_mask,
        max_new_tokens=24,
        generator=torch.Generator().manual_seed(0),
        **sampling,
    )
    prompt_length = prompts.input_ids.shape[1]
    sequences = torch.cat([prompts.input_ids, out.completion_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, out.completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
    probs = probs_from_logits(logits[:, prompt_length - 1 : -1], **sampling)
    expected = probs.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1).log()
    valid = out.completion_mask.bool()
    torch.testing.assert_close(out.logprobs[valid], expected[valid], atol=1e-4, rtol=0)
    assert (out.logprobs[~valid] == 0).all()
    entropy = torch.special.entr(probs).sum(-1)
    torch.testing.assert_close(out.stats.entropy[valid], entropy[valid], atol=1e-4, rtol=0)
    assert out.stats.mean_entropy == pytest.approx(float(entropy[valid].mean()), abs=1e-4)


@pytest.fixture(scope="module")
def eagle3_head(policy):
    return perturbed_head(policy, scale=0.02, layout="eagle3", aux_layers=[0, 1])


@pytest.mark.parametrize("layout", ["eagle", "eagle3"])
def test_drafts_match_an_uncached_head(policy, head, eagle3_head, prompts, monkeypatch, layout):
    """The head's cached drafts equal a from-scratch recomputation at every cycle of every row."""
    head = eagle3_head if layout == "eagle3" else head
    k, cycles = 3, []
    draft = SpeculativeGenerator._draft

    def recording_draft(self, batch, *args):
        drafts = draft(self, batch, *args)
        cycles.append((batch.requests.clone(), drafts.tokens, drafts.probs))
        return drafts

    accepted = []
    rejection_sample = engine.rejection_sample

    def recording_rejection_sample(*args, **kwargs):
        tokens, num_accepted = rejection_sample(*args, **kwargs)
        accepted.append(num_accepted)
        return tokens, num_accepted

    monkeypatch.setattr(SpeculativeGenerator, "_draft", recording_draft)
    monkeypatch.setattr(engine, "rejection_sample", recording_rejection_sample)
    out = SpeculativeGenerator(policy, head, num_speculative_tokens=k).generate(
        prompts.input_ids,
        prompts.attention_mask,
        max_new_tokens=12,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(0),
    )
    assert sum(int(n.sum()) for n in accepted) > 0, "the test needs accepted drafts"
    lengths = torch.ones(len(PROMPTS), dtype=torch.long)
    for (rows, draft_tokens, draft_probs), num_accepted in zip(cycles, accepted, strict=True):
        for i, row in enumerate(rows.tolist()):
            prompt = prompts.input_ids[row][prompts.attention_mask[row].bool()].tolist()
            sequence = prompt + out.completion_ids[row, : lengths[row]].tolist()
            expected = uncached_draft_probs(policy, head, sequence, draft_tokens[i, :-1].tolist())
            torch.testing.assert_close(draft_probs[i], expected, atol=1e-5, rtol=1e-4)
        lengths[rows] += num_accepted + 1


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_first_cycle_acceptance_is_the_analytic_one(tokenizer, draft_sampling):
    """Step-1 acceptance converges to E[sum min(p, q)] (probabilistic) or E[p(argmax q)] (greedy)."""
    policy = tiny_causal_lm("llama", seed=1, vocab_size=8)
    head = perturbed_head(policy, scale=0.1)
    prompt, rows = [4, 5, 6], 20_000
    with torch.no_grad():
        first = probs_from_logits(policy(torch.tensor([prompt])).logits[0, -1])
        sequences = [[*prompt, token] for token in range(8)]
        p = probs_from_logits(policy(torch.tensor(sequences)).logits[:, -1])
        q = torch.stack([uncached_draft_probs(policy, head, s, [])[0] for s in sequences])
    if draft_sampling == "probabilistic":
        per_first_token = torch.minimum(p, q).sum(-1)
    else:
        per_first_token = p.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    expected = float((first * per_first_token).sum())

    input_ids = torch.tensor([prompt]).expand(rows, -1)
    out = SpeculativeGenerator(policy, head, num_speculative_tokens=1, draft_sampling=draft_sampling).generate(
        input_ids, max_new_tokens=2, eos_token_id=[], generator=torch.Generator().manual_seed(0)
    )
    assert out.stats.num_drafts == rows
    assert abs(binomial_z(out.stats.num_accepted_tokens, rows, expected)) < 5


def test_statistics_are_consistent(policy, head, prompts):
    k = 3
    out = SpeculativeGenerator(policy, head, num_speculative_tokens=k).generate(
        prompts.input_ids, prompts.attention_mask, max_new_tokens=30, generator=torch.Generator().manual_seed(0)
    )
    stats = out.stats
    assert stats.num_speculative_tokens == k and stats.num_draft_tokens == k * stats.num_drafts
    assert stats.num_accepted_tokens == int(stats.accepted_per_position.sum())
    assert (stats.accepted_per_position.diff() <= 0).all(), "a draft is verified only if the earlier ones passed"
    assert stats.acceptance_rate == stats.num_accepted_tokens / stats.num_draft_tokens
    assert stats.accepted_drafts_per_cycle == stats.num_accepted_tokens / stats.num_drafts
    # Each cycle emits its accepted drafts plus one token; only the last cycle of a row may be cut short.
    emitted = int(out.completion_lengths.sum()) - len(PROMPTS)
    assert emitted <= stats.num_drafts + stats.num_accepted_tokens
    # Per-row counters add up to the totals, and row by row the same bound holds.
    assert int(stats.drafts_per_row.sum()) == stats.num_drafts
    assert int(stats.accepted_per_row.sum()) == stats.num_accepted_tokens
    assert (out.completion_lengths - 1 <= stats.drafts_per_row + stats.accepted_per_row).all()
    torch.testing.assert_close(
        stats.row_acceptance_rate, stats.accepted_per_row.double() / (k * stats.drafts_per_row).double()
    )
    mask = out.completion_mask.bool()
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(stats.mean_entropy_per_row[row], stats.entropy[row][mask[row]].mean())
    assert set(stats.to_dict()) >= {"acceptance_rate", "accepted_drafts_per_cycle", "mean_entropy"}

    plain = SpeculativeGenerator(policy).generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=5)
    assert plain.stats.num_drafts == plain.stats.num_draft_tokens == 0 and plain.stats.acceptance_rate == 0.0


def test_generator_makes_runs_reproducible(policy, head, prompts):
    speculative = SpeculativeGenerator(policy, head, num_speculative_tokens=2)

    def run(seed):
        return speculative.generate(
            prompts.input_ids,
            prompts.attention_mask,
            max_new_tokens=16,
            generator=torch.Generator().manual_seed(seed),
        ).completion_ids

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_training_flags_are_restored(policy, head, prompts):
    policy.train()
    head.train()
    try:
        SpeculativeGenerator(policy, head).generate(
            prompts.input_ids, prompts.attention_mask, max_new_tokens=3, progress=True
        )
        assert policy.training and head.training
    finally:
        policy.eval()
        head.eval()


def test_head_for_another_policy_is_rejected(policy):
    wider = tiny_causal_lm("llama", seed=0, hidden_size=96)
    with pytest.raises(ValueError, match="hidden size"):
        SpeculativeGenerator(wider, MTPHead.from_model(policy))


def test_model_with_recurrent_layers_is_rejected():
    hybrid = tiny_causal_lm("qwen3_5", seed=0)
    with pytest.raises(ValueError, match="rolled back"):
        SpeculativeGenerator(hybrid, MTPHead.from_model(hybrid))
    assert SpeculativeGenerator(hybrid).generate(torch.tensor([[5, 6]]), max_new_tokens=3).completion_ids.shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(num_speculative_tokens=0), "num_speculative_tokens"), (dict(draft_sampling="typical"), "draft_sampling")],
)
def test_bad_engine_arguments_raise(policy, head, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeGenerator(policy, head, **kwargs)


@pytest.mark.parametrize(
    ("input_ids", "attention_mask", "kwargs", "match"),
    [
        (torch.empty(2, 0, dtype=torch.long), None, {}, "non-empty"),
        (torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]]), {}, "at least one token"),
        (torch.tensor([[5, 0], [5, 6]]), torch.tensor([[1, 0], [1, 1]]), {}, "left-padded"),
        (torch.tensor([[5, 6]]), None, dict(max_new_tokens=0), "max_new_tokens"),
        (torch.tensor([[5, 6]]), None, dict(temperature=-1.0), "temperature"),
        (torch.tensor([[5, 6]]), None, dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_generate_arguments_raise(policy, head, input_ids, attention_mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeGenerator(policy, head).generate(input_ids, attention_mask, **{"max_new_tokens": 4, **kwargs})


def test_ragged_prompts_of_token_ids(policy, head):
    # Rows of a left-padded batch give the same greedy completions as when run alone.
    prompts = [[10, 20, 30, 40, 50, 60], [70], [80, 90, 100]]
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    speculative = SpeculativeGenerator(policy, head, num_speculative_tokens=2)
    batched = speculative.generate(input_ids, attention_mask, max_new_tokens=10, temperature=0, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = speculative.generate(torch.tensor([prompt]), max_new_tokens=10, temperature=0, eos_token_id=[])
        assert torch.equal(batched.completion_ids[row], alone.completion_ids[0])


def test_auto_draft_length_calibrates_on_the_first_batch(policy, head, prompts):
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens="auto")
    assert engine.num_speculative_tokens == AUTO_MAX_DRAFT_TOKENS and engine.draft_length is None
    out = engine.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=16, eos_token_id=[])
    costs = engine.draft_length.costs
    assert costs.max_draft_tokens == AUTO_MAX_DRAFT_TOKENS and costs.verify[0] == 1.0 and costs.draft > 0
    stats = out.stats
    assert stats.num_speculative_tokens == AUTO_MAX_DRAFT_TOKENS
    assert stats.num_draft_tokens == int(stats.drafted_per_position.sum()) == int(stats.draft_tokens_per_row.sum())
    assert stats.drafted_per_position[0] == stats.num_drafts
    # The policy learnt from the cycles it saw: its table holds more than the prior's pseudo-counts.
    assert engine.draft_length.verified.sum() > 10 * 4.0 + stats.num_drafts - 1


def test_draft_length_must_know_the_costs_of_every_length(policy, head):
    with pytest.raises(ValueError, match="knows the costs of up to 2 drafts"):
        SpeculativeGenerator(policy, head, 3, draft_length=AdaptiveDraftLength(StepCosts(0.1, (1.0, 1.1, 1.2))))
    with pytest.raises(ValueError, match="an int >= 1 or 'auto'"):
        SpeculativeGenerator(policy, head, "four")
