"""`mtp_loss` with the policy's log-normalisers computed once per position (`target_lse`)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bebop_trl.ops import mtp_loss
from bebop_trl.ops.chunked import policy_log_normalizer
from bebop_trl.ops.reference import mtp_loss_reference

from . import test_mtp_loss as full
from . import test_mtp_loss_draft_vocab as restricted
from .test_mtp_loss import (
    LOSS_TYPES,
    TRITON_DEVICES,
    assert_close_outputs,
    assert_grad_close,
    ignore_masked_lane_nan,
    require_triton,
    run,
    to_device,
)


def full_vocab_case(case: str, device: str = "cpu") -> tuple[dict, dict]:
    num_steps, num_positions, hidden, vocab, lengths, temperature, token_tile, vocab_tile = full.CASES[case]
    inputs = to_device(full.make_inputs(num_steps, num_positions, hidden, vocab, lengths=lengths), device)
    return inputs, {"temperature": temperature, "token_tile": token_tile, "vocab_tile": vocab_tile}


def with_target_lse(inputs: dict, temperature: float) -> dict:
    # Another tiling than the loss's, as a caller computing it per position would use.
    lse = policy_log_normalizer(inputs["target_hidden"], inputs["lm_head_weight"], temperature, 3, 17)
    return {**inputs, "target_lse": lse}


def check(inputs: dict, options: dict, loss_type: str, backend: str = "auto") -> None:
    out, grad = run(mtp_loss, with_target_lse(inputs, options["temperature"]), loss_type=loss_type, backend=backend,
                    **options)  # fmt: skip
    ref, ref_grad = run(mtp_loss_reference, inputs, loss_type=loss_type, temperature=options["temperature"])
    assert_close_outputs(out, ref, atol=1e-5)
    torch.testing.assert_close(
        out.target_mass_outside_draft_vocab, ref.target_mass_outside_draft_vocab, atol=1e-5, rtol=0, equal_nan=True
    )
    if ref_grad.abs().max() > 0:
        assert_grad_close(grad, ref_grad, rel=1e-4)


FULL_CASES = ["single-slot", "ragged", "five-steps-hot", "wider-than-a-block"]
DRAFT_VOCAB_CASES = ["ragged", "five-steps-hot", "one-token-vocab", "draft-wider-than-a-tile"]


@pytest.mark.parametrize("case", FULL_CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_over_the_whole_vocabulary(loss_type, case):
    check(*full_vocab_case(case), loss_type)


@pytest.mark.parametrize("case", DRAFT_VOCAB_CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_with_a_draft_vocabulary(loss_type, case):
    check(*restricted.case_inputs(case), loss_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_policy_log_normalizer_is_the_logsumexp_of_the_logits(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=generator).to(dtype)
    weight = torch.randn(300, 16, generator=generator).to(dtype)
    lse = policy_log_normalizer(hidden, weight, temperature=0.7, token_tile=4, vocab_tile=64)
    expected = torch.logsumexp(hidden.double() @ weight.double().T / 0.7, dim=-1)
    assert lse.shape == (3, 7) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-6)


class LogitsColumns(TorchFunctionMode):
    """Counts the logits entries every matrix product of the loss computes."""

    def __init__(self):
        super().__init__()
        self.entries = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.mm, torch.Tensor.mm):
            self.entries += args[0].shape[0] * args[1].shape[1]
        return func(*args, **(kwargs or {}))


def test_a_draft_vocabulary_no_longer_sweeps_the_whole_vocabulary_per_slot():
    inputs, options = restricted.case_inputs("ragged")
    vocab_size, draft_size = inputs["lm_head_weight"].shape[0], len(inputs["draft_vocab"])
    slots = int(inputs["mask"].sum())
    counts = {}
    for name, given in (("inside", inputs), ("given", with_target_lse(inputs, options["temperature"]))):
        with torch.no_grad(), LogitsColumns() as counter:
            mtp_loss(**given, loss_type="tv", **{**options, "token_tile": 512, "vocab_tile": 512})
        counts[name] = counter.entries
    # In one vocabulary tile, each slot pays the whole vocabulary once without target_lse, and the draft
    # vocabulary once for each model either way.
    assert counts["inside"] - counts["given"] == slots * vocab_size
    assert counts["given"] == slots * draft_size * 2


def test_bad_target_lse_raises():
    inputs, options = full_vocab_case("ragged")
    with pytest.raises(ValueError, match="target_lse must be a floating-point"):
        mtp_loss(**inputs, target_lse=torch.zeros(2, 2), **options)


@ignore_masked_lane_nan
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_matches_reference(device, loss_type):
    require_triton(device)
    check(*full_vocab_case("ragged", device), loss_type, backend="triton")
    check(*restricted.case_inputs("ragged", device), loss_type, backend="triton")
