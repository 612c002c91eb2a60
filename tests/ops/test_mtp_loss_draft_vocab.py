"""`mtp_loss` with a draft vocabulary: a head whose q lives on a subset D of the policy's vocabulary."""

import pytest
import torch

from bebop_trl.ops import MTPLoss, mtp_loss
from bebop_trl.ops.reference import mtp_loss_reference

from .test_mtp_loss import (
    LOSS_TYPES,
    TRITON_DEVICES,
    assert_close_outputs,
    assert_grad_close,
    ignore_masked_lane_nan,
    make_inputs,
    require_triton,
    run,
    to_device,
)


def with_draft_vocab(inputs: dict, size: int, *, seed: int = 0, drift: float = 0.05) -> dict:
    """`inputs` plus a random sorted draft vocabulary of `size` ids and the head's own rows for it.

    The head's rows are the policy's plus `drift` noise (a policy updated after the head was built), so a test
    notices if the draft's logits were taken from the policy's rows or the policy's from the head's.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = inputs["lm_head_weight"]
    vocab_size, hidden_size = weight.shape
    draft_vocab = torch.randperm(vocab_size, generator=generator)[:size].sort().values
    rows = weight.float()[draft_vocab] + drift * torch.randn(size, hidden_size, generator=generator)
    return {**inputs, "draft_lm_head_weight": rows.to(weight.dtype), "draft_vocab": draft_vocab}


# (S, N, H, V, |D|, lengths per start position or None, temperature, token_tile, vocab_tile)
CASES = {
    "single-slot": (1, 1, 8, 50, 20, None, 1.0, 4, 16),
    "ragged": (3, 37, 16, 300, 90, [3, 0, 1, 2] * 9 + [3], 0.7, 8, 64),
    "five-steps-hot": (5, 6, 12, 129, 48, [5, 4, 3, 2, 1, 5], 1.5, 4, 32),
    "one-token-vocab": (2, 5, 8, 40, 1, [2, 1, 0, 2, 1], 1.0, 2, 16),
    "everything": (2, 9, 8, 64, 64, None, 2.0, 64, 64),
    "draft-wider-than-a-tile": (2, 7, 8, 100, 70, [2, 1, 2, 0, 1, 2, 2], 0.9, 3, 16),
}


def case_inputs(case: str, device: str = "cpu") -> tuple[dict, dict]:
    """The inputs of `CASES[case]` and the options of `mtp_loss` for it."""
    num_steps, num_positions, hidden, vocab, draft_size, lengths, temperature, token_tile, vocab_tile = CASES[case]
    inputs = with_draft_vocab(make_inputs(num_steps, num_positions, hidden, vocab, lengths=lengths), draft_size)
    return to_device(inputs, device), {"temperature": temperature, "token_tile": token_tile, "vocab_tile": vocab_tile}


def check_matches_reference(loss_type: str, case: str, backend: str = "auto", device: str = "cpu") -> None:
    inputs, options = case_inputs(case, device)
    out, grad = run(mtp_loss, inputs, loss_type=loss_type, backend=backend, **options)
    ref, ref_grad = run(mtp_loss_reference, inputs, loss_type=loss_type, temperature=options["temperature"])
    assert_close_outputs(out, ref, atol=1e-5)
    torch.testing.assert_close(
        out.target_mass_outside_draft_vocab, ref.target_mass_outside_draft_vocab, atol=1e-5, rtol=0, equal_nan=True
    )
    if len(inputs["draft_vocab"]) == 1:
        # A one-token draft is certain whatever its logits: the exact gradient is 0, the computed one rounding.
        assert ref_grad.abs().max() == 0 and grad.abs().max() < 1e-6
    else:
        assert_grad_close(grad, ref_grad, rel=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(loss_type, case):
    check_matches_reference(loss_type, case)


def naive_acceptance(inputs: dict, temperature: float) -> torch.Tensor:
    """[S, N] sum over D of min(p_v, q_v), with p the policy's softmax over the whole vocabulary, slot by slot."""
    num_steps, num_positions, _ = inputs["draft_hidden"].shape
    acceptance = torch.zeros(num_steps, num_positions, dtype=torch.float64)
    for step in range(num_steps):
        for position in range(num_positions):
            p = torch.softmax(
                inputs["target_hidden"][step, position].double() @ inputs["lm_head_weight"].double().T / temperature,
                dim=0,
            )
            q = torch.softmax(
                inputs["draft_hidden"][step, position].detach().double()
                @ inputs["draft_lm_head_weight"].double().T
                / temperature,
                dim=0,
            )
            acceptance[step, position] = sum(
                min(p[token], q[row]) for row, token in enumerate(inputs["draft_vocab"].tolist())
            )
    return acceptance


@pytest.mark.parametrize("case", ["ragged", "five-steps-hot", "one-token-vocab"])
def test_acceptance_is_the_exact_overlap_with_the_full_vocabulary_policy(case):
    inputs, options = case_inputs(case)
    out = mtp_loss(**inputs, loss_type="tv", **options)
    mask = inputs["mask"] if inputs["mask"] is not None else torch.ones(out.tv.shape[0], 1, dtype=torch.bool)
    mask = mask.expand(inputs["draft_hidden"].shape[:2])
    slot_acceptance = naive_acceptance(inputs, options["temperature"])
    for step in range(len(out.acceptance)):
        expected = slot_acceptance[step][mask[step]].mean().float()
        if mask[step].any():
            torch.testing.assert_close(out.acceptance[step], expected, atol=1e-5, rtol=0)
    # Rejection sampling never accepts the policy's mass outside D.
    valid_steps = mask.any(dim=1)
    assert (out.acceptance[valid_steps] <= 1 - out.target_mass_outside_draft_vocab[valid_steps] + 1e-6).all()
    assert (out.target_mass_outside_draft_vocab[valid_steps] > 0).all()


def test_renormalising_p_over_the_draft_vocabulary_would_overstate_acceptance():
    inputs, options = case_inputs("ragged")
    out = mtp_loss(**inputs, loss_type="tv", **options)
    # A head whose q is exactly p renormalised over D reaches the ceiling p(D), not 1.
    perfect = {**inputs, "draft_lm_head_weight": inputs["lm_head_weight"][inputs["draft_vocab"]]}
    perfect["draft_hidden"] = inputs["target_hidden"].clone().requires_grad_()
    best = mtp_loss(**perfect, loss_type="tv", **options)
    torch.testing.assert_close(best.acceptance, 1 - best.target_mass_outside_draft_vocab, atol=1e-5, rtol=0)
    assert (best.acceptance < 0.999).all() and (out.acceptance < best.acceptance).all()
    # Its forward KL against p renormalised over D is 0, and its reverse KL is -log p(D) per slot.
    assert mtp_loss(**perfect, loss_type="kl", **options).loss.abs() < 1e-5
    assert mtp_loss(**perfect, loss_type="rkl", **options).loss > 0.1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_whole_vocabulary_as_draft_vocabulary_changes_nothing(loss_type):
    inputs = make_inputs(3, 11, 8, 70, lengths=[3, 2, 1, 0, 3, 3, 2, 1, 1, 2, 3], seed=20)
    full_vocab = {
        **inputs,
        "draft_lm_head_weight": inputs["lm_head_weight"],
        "draft_vocab": torch.arange(70),
    }
    out, grad = run(mtp_loss, full_vocab, loss_type=loss_type, token_tile=4, vocab_tile=32)
    plain, plain_grad = run(mtp_loss, inputs, loss_type=loss_type, token_tile=4, vocab_tile=32)
    assert_close_outputs(out, plain, atol=1e-5)
    assert_grad_close(grad, plain_grad, rel=1e-4)
    assert out.target_mass_outside_draft_vocab.abs().max() < 1e-6
    assert (plain.target_mass_outside_draft_vocab == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    inputs = with_draft_vocab(make_inputs(3, 4, 5, 23, dtype=torch.float64, lengths=[3, 1, 2, 0], seed=2), 9)
    draft = inputs.pop("draft_hidden").detach().requires_grad_()

    blend = {"kl_scale": 0.5, "kl_decay": 0.0} if "lambda" in loss_type else {}  # as in test_mtp_loss.py

    def loss(draft_hidden):
        return mtp_loss(
            draft_hidden, **inputs, loss_type=loss_type, temperature=0.9, token_tile=2, vocab_tile=4, **blend
        ).loss

    assert torch.autograd.gradcheck(loss, (draft,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_half_precision_matches_fp32_reference(loss_type):
    inputs = with_draft_vocab(
        make_inputs(3, 20, 16, 200, dtype=torch.bfloat16, lengths=[3, 2, 1, 0] * 5, seed=1), 64, seed=1
    )
    out, grad = run(mtp_loss, inputs, loss_type=loss_type, temperature=0.8, token_tile=8, vocab_tile=64)
    fp32_inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    ref, ref_grad = run(mtp_loss_reference, fp32_inputs, loss_type=loss_type, temperature=0.8)
    assert grad.dtype == torch.bfloat16
    assert_close_outputs(out, ref, atol=1e-5)
    assert_grad_close(grad, ref_grad, rel=1e-2)


def test_ce_skips_labels_outside_the_draft_vocabulary():
    inputs = with_draft_vocab(make_inputs(2, 6, 8, 40, seed=21), 10, seed=21)
    outside = torch.tensor([t for t in range(40) if t not in set(inputs["draft_vocab"].tolist())])
    inputs["labels"] = outside[torch.arange(12) % len(outside)].view(2, 6)
    out, grad = run(mtp_loss, inputs, loss_type="ce", token_tile=4, vocab_tile=8)
    assert out.loss == 0 and (grad == 0).all()
    # One label in D: the loss is that slot's cross-entropy alone, not diluted by the skipped slots.
    inputs["labels"][1, 3] = inputs["draft_vocab"][4]
    out = mtp_loss(**inputs, loss_type="ce", token_tile=4, vocab_tile=8)
    q = torch.log_softmax(inputs["draft_hidden"][1, 3].detach() @ inputs["draft_lm_head_weight"].T, dim=0)
    torch.testing.assert_close(out.loss.detach(), -q[4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_frozen_inputs_get_no_gradient(loss_type):
    inputs = with_draft_vocab(make_inputs(2, 5, 8, 40, lengths=[2, 1, 2, 2, 1], seed=7), 25)
    for name in ("lm_head_weight", "draft_lm_head_weight", "target_hidden"):
        inputs[name].requires_grad_()
    mtp_loss(**inputs, loss_type=loss_type, token_tile=4, vocab_tile=16).loss.backward()
    assert inputs["draft_hidden"].grad is not None and inputs["draft_hidden"].grad.abs().sum() > 0
    assert inputs["lm_head_weight"].grad is None and inputs["draft_lm_head_weight"].grad is None
    assert inputs["target_hidden"].grad is None


def test_module_passes_the_draft_vocabulary():
    inputs = with_draft_vocab(make_inputs(2, 5, 8, 40, seed=10), 12)
    module_out = MTPLoss(loss_type="tv", token_tile=3, vocab_tile=16)(
        inputs["draft_hidden"],
        inputs["target_hidden"],
        inputs["lm_head_weight"],
        draft_lm_head_weight=inputs["draft_lm_head_weight"],
        draft_vocab=inputs["draft_vocab"],
    )
    function_out = mtp_loss(**{k: v for k, v in inputs.items() if k not in ("mask", "labels")}, loss_type="tv")
    assert_close_outputs(module_out, function_out, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"draft_vocab": None}, "Pass draft_lm_head_weight and draft_vocab together"),
        ({"draft_lm_head_weight": None}, "Pass draft_lm_head_weight and draft_vocab together"),
        ({"draft_lm_head_weight": torch.randn(6, 7)}, r"\[\|D\|, H\] tensor with H = 8"),
        ({"draft_lm_head_weight": torch.randn(5, 8)}, "draft_vocab has 6 ids but draft_lm_head_weight has 5 rows"),
        ({"draft_vocab": torch.tensor([0.0, 1, 2, 3, 4, 5])}, "1-D integer tensor"),
        ({"draft_vocab": torch.tensor([0, 2, 1, 3, 4, 5])}, "strictly increasing"),
        ({"draft_vocab": torch.tensor([0, 1, 1, 3, 4, 5])}, "strictly increasing"),
        ({"draft_vocab": torch.tensor([1, 2, 3, 4, 5, 30])}, r"must lie in \[0, 30\)"),
        ({"draft_vocab": torch.tensor([-1, 2, 3, 4, 5, 6])}, r"must lie in \[0, 30\)"),
        ({"draft_vocab": torch.tensor([], dtype=torch.long), "draft_lm_head_weight": torch.randn(0, 8)}, "empty"),
    ],
)
def test_bad_draft_vocabulary_raises(change, message):
    inputs = with_draft_vocab(make_inputs(2, 5, 8, 30, seed=12), 6)
    with pytest.raises(ValueError, match=message):
        mtp_loss(**{**inputs, "loss_type": "tv", **change})


@ignore_masked_lane_nan
@pytest.mark.parametrize("case", ["ragged", "one-token-vocab", "draft-wider-than-a-tile"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_matches_reference(device, loss_type, case):
    require_triton(device)
    check_matches_reference(loss_type, case, backend="triton", device=device)
