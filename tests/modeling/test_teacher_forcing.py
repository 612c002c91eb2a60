import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.modeling.model_inputs import positions_from_mask
from bebop_trl.modeling.teacher_forcing import (
    IGNORE_INDEX,
    completion_token_mask,
    drafting_slots,
    final_hidden_states,
    slot_targets,
    unroll_teacher_forced,
)


@pytest.fixture
def policy_and_head(load_tiny):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy)
    torch.manual_seed(0)
    with torch.no_grad():  # the attention and MLP branches start at zero: make them contribute
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return policy, head


def test_final_hidden_states_match_the_full_forward(load_tiny):
    policy = load_tiny("qwen3")
    ids = torch.randint(4, 100, (2, 9))
    expected = policy(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(final_hidden_states(policy, ids), expected)


def engine_drafts(head, ids, hidden, start, num_steps):
    """The head's hidden states drafting from `start` as the engine does: a catch-up over the step-1 slots of the
    prefix into a KV cache, then one cached step at a time fed with the head's own output."""
    batch, length = ids.shape
    cache = head.new_cache()
    positions = torch.arange(1, start + 2).expand(batch, -1)
    out = head(
        hidden[:, : start + 1], ids[:, 1 : start + 2], position_ids=positions, past_key_values=cache, use_cache=True
    )
    drafts = [out.last_hidden_state[:, -1]]
    for j in range(2, min(num_steps, length - 1 - start) + 1):
        position = torch.full((batch, 1), start + j)
        out = head(
            drafts[-1][:, None], ids[:, start + j, None], position_ids=position, past_key_values=cache, use_cache=True
        )
        drafts.append(out.last_hidden_state[:, 0])
    return drafts


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_5"])
def test_slots_are_what_the_engine_drafts(load_tiny, model_type):
    policy = load_tiny(model_type)
    head = MTPHead.from_model(policy)
    torch.manual_seed(0)
    with torch.no_grad():  # the attention and MLP branches start at zero: make them contribute
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(4, 100, (2, 8))
    with torch.no_grad():
        hidden = final_hidden_states(policy, ids)
        out = unroll_teacher_forced(head, ids, hidden, num_steps=3)
        batch, length = ids.shape
        starts = length - 1
        assert out.draft_hidden.shape == (3, batch * starts, 64)
        for t in range(starts):
            drafts = engine_drafts(head, ids, hidden, t, num_steps=3)
            for j in range(1, 4):
                for b in range(batch):
                    n = b * starts + t
                    inside = t + j < length
                    assert out.mask[j - 1, n] == inside
                    if not inside:
                        continue
                    torch.testing.assert_close(out.draft_hidden[j - 1, n], drafts[j - 1][b], rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(out.target_hidden[j - 1, n], hidden[b, t + j])
                    expected_label = ids[b, t + j + 1] if t + j + 1 < length else IGNORE_INDEX
                    assert out.labels[j - 1, n] == expected_label


def test_masks_are_prefix_closed_and_padding_does_not_leak(policy_and_head):
    policy, head = policy_and_head
    torch.manual_seed(1)
    ids = torch.randint(4, 100, (1, 10))
    pad = 3
    left = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    left_mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    right = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    right_mask = left_mask.flip(-1)
    with torch.no_grad():
        alone = unroll_teacher_forced(head, ids, final_hidden_states(policy, ids), num_steps=2)
        for padded, mask in ((left, left_mask), (right, right_mask)):
            out = unroll_teacher_forced(head, padded, final_hidden_states(policy, padded, mask), mask, num_steps=2)
            assert (out.mask[1:] <= out.mask[:-1]).all(), "mask must be prefix-closed along the steps"
            assert out.mask.sum() == alone.mask.sum()
            assert (out.label_mask.sum(-1) == alone.label_mask.sum(-1)).all()
            torch.testing.assert_close(
                out.draft_hidden[out.mask], alone.draft_hidden[alone.mask], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(out.target_hidden[out.mask], alone.target_hidden[alone.mask])
            assert torch.equal(out.labels[out.label_mask], alone.labels[alone.label_mask])


@pytest.mark.parametrize("num_steps", [1, 3])
def test_slot_targets_pick_each_slots_target_position(policy_and_head, num_steps):
    policy, head = policy_and_head
    ids = torch.randint(4, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    hidden = final_hidden_states(policy, ids, mask)
    with torch.no_grad():
        slots = unroll_teacher_forced(head, ids, hidden, mask, num_steps=num_steps)
    # A per-position value gathered per slot is the value of the slot's target hidden state.
    per_position = hidden.sum(-1)
    gathered = slot_targets(per_position, num_steps)
    assert gathered.shape == slots.mask.shape
    torch.testing.assert_close(gathered[slots.mask], slots.target_hidden.sum(-1)[slots.mask])


def test_gradients_reach_only_the_head(policy_and_head):
    policy, head = policy_and_head
    ids = torch.randint(4, 100, (2, 6))
    hidden = final_hidden_states(policy, ids)
    out = unroll_teacher_forced(head, ids, hidden, num_steps=2)
    out.draft_hidden[out.mask].pow(2).mean().backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert not out.target_hidden.requires_grad


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_bad_lengths(policy_and_head):
    _, head = policy_and_head
    with pytest.raises(ValueError, match="at least 2 tokens"):
        unroll_teacher_forced(head, torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        unroll_teacher_forced(head, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, 64), num_steps=0)


def test_completion_token_mask_with_left_and_right_padding():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    prompt_length = torch.tensor([2, 3, 0])
    expected = [
        [False, False, False, False, True, True],
        [False, False, False, True, False, False],
        [True, True, True, True, True, True],
    ]
    assert completion_token_mask(attention_mask, prompt_length).tolist() == expected


def test_drafting_slots_start_where_the_next_token_is_sampled():
    is_completion = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    slots = drafting_slots(is_completion, num_steps=3)
    assert slots.shape == (3, 2 * 4)
    # Start t drafts after reading x_{t+1}: row 0's first drafting start is t = 1 (the last prompt position).
    assert slots[0].view(2, 4).tolist() == [[False, True, True, True], [True, True, False, False]]
    assert (slots == slots[0]).all(), "the same starts at every step keeps the mask prefix-closed"
