import importlib.util
import os
import sys

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from bebop_trl.ops import MTPLoss, MTPLossOutput, mtp_loss
from bebop_trl.ops.chunked import compute_dtype
from bebop_trl.ops.fused_mtp_loss import LOSS_TYPES
from bebop_trl.ops.reference import mtp_loss_reference


# The module, not the function of the same name that `bebop_trl.ops` exports.
mtp_loss_module = importlib.import_module("bebop_trl.ops.fused_mtp_loss")


def make_inputs(
    num_steps: int,
    num_positions: int,
    hidden_size: int,
    vocab_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    lengths: list[int] | None = None,
    seed: int = 0,
) -> dict:
    """Random inputs whose draft and policy distributions overlap partly, so TV sits well inside (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(num_steps, num_positions, hidden_size, generator=generator)
    draft = target + 0.8 * torch.randn(num_steps, num_positions, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * 2 / hidden_size**0.5
    labels = torch.randint(vocab_size, (num_steps, num_positions), generator=generator)
    mask = None
    if lengths is not None:
        mask = torch.arange(num_steps)[:, None] < torch.tensor(lengths)[None, :]
        # Masked slots may hold anything, e.g. an ignore index.
        labels = labels.masked_fill(~mask, -100)
    return {
        "draft_hidden": draft.to(dtype).requires_grad_(),
        "target_hidden": target.to(dtype),
        "lm_head_weight": weight.to(dtype),
        "mask": mask,
        "labels": labels,
    }


def run(fn, inputs: dict, **kwargs) -> tuple[MTPLossOutput, torch.Tensor]:
    """Calls `fn` on a fresh leaf copy of draft_hidden and returns its output and the gradient of the loss."""
    draft = inputs["draft_hidden"].detach().requires_grad_()
    out = fn(**{**inputs, "draft_hidden": draft}, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, draft)
    return out, grad


def assert_close_outputs(actual: MTPLossOutput, expected: MTPLossOutput, atol: float) -> None:
    torch.testing.assert_close(actual.loss, expected.loss, atol=atol, rtol=0)
    torch.testing.assert_close(actual.tv, expected.tv, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(actual.acceptance, expected.acceptance, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(actual.expected_accepted_length, expected.expected_accepted_length, atol=atol, rtol=0)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    error = (actual.float() - expected).abs().max()
    assert error <= rel * expected.abs().max(), f"max gradient error {error:.3g} vs scale {expected.abs().max():.3g}"


# (S, N, H, V, lengths per start position or None, temperature, token_tile, vocab_tile)
CASES = {
    "single-slot": (1, 1, 8, 50, None, 1.0, 4, 16),
    "ragged": (3, 37, 16, 300, [3, 0, 1, 2] * 9 + [3], 0.7, 8, 64),
    "five-steps-hot": (5, 6, 12, 129, [5, 4, 3, 2, 1, 5], 1.5, 4, 128),
    "all-but-one-masked": (4, 5, 8, 70, [1, 0, 0, 0, 0], 1.0, 2, 32),
    "one-tile": (2, 9, 8, 64, None, 2.0, 64, 64),
    # A vocabulary tile wider than the Triton kernels' 4096-column blocks, so that each program loops over its row.
    "wider-than-a-block": (2, 3, 8, 5000, [2, 1, 0], 0.9, 2, 8192),
}


def check_matches_reference_fp32(loss_type: str, case: str, backend: str = "auto", device: str = "cpu") -> None:
    """Runs `CASES[case]` through `mtp_loss` and the reference in float32 and compares values and gradients."""
    num_steps, num_positions, hidden, vocab, lengths, temperature, token_tile, vocab_tile = CASES[case]
    inputs = to_device(make_inputs(num_steps, num_positions, hidden, vocab, lengths=lengths), device)
    out, grad = run(
        mtp_loss,
        inputs,
        loss_type=loss_type,
        temperature=temperature,
        token_tile=token_tile,
        vocab_tile=vocab_tile,
        backend=backend,
    )
    ref, ref_grad = run(mtp_loss_reference, inputs, loss_type=loss_type, temperature=temperature)
    assert_close_outputs(out, ref, atol=1e-5)
    assert_grad_close(grad, ref_grad, rel=1e-4)
    assert ref_grad.abs().max() > 0


def check_half_precision_matches_fp32_reference(
    loss_type: str, dtype: torch.dtype, backend: str = "auto", device: str = "cpu"
) -> None:
    """Runs `mtp_loss` on `dtype` inputs and the reference on the same values in float32, and compares them."""
    inputs = to_device(make_inputs(3, 20, 16, 200, dtype=dtype, lengths=[3, 2, 1, 0] * 5, seed=1), device)
    out, grad = run(
        mtp_loss, inputs, loss_type=loss_type, temperature=0.8, token_tile=8, vocab_tile=64, backend=backend
    )
    # The reference runs in float32 on the same rounded values, so only the output rounding differs.
    fp32_inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    ref, ref_grad = run(mtp_loss_reference, fp32_inputs, loss_type=loss_type, temperature=0.8)
    assert grad.dtype == dtype
    assert out.loss.dtype == torch.float32
    # Tile math is float32, so values match as tightly as in float32; the gradient is rounded to `dtype` once.
    assert_close_outputs(out, ref, atol=1e-5)
    assert_grad_close(grad, ref_grad, rel=1e-2)


def to_device(inputs: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_fp32(loss_type, case):
    check_matches_reference_fp32(loss_type, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_half_precision_matches_fp32_reference(loss_type, dtype):
    check_half_precision_matches_fp32_reference(loss_type, dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    inputs = make_inputs(3, 4, 5, 23, dtype=torch.float64, lengths=[3, 1, 2, 0], seed=2)
    draft = inputs.pop("draft_hidden").detach().requires_grad_()

    # The lambda forms' KL weight is a function of the acceptance without gradient, which finite differences would
    # differentiate: a constant weight (kl_decay = 0) checks the gradients of both blended terms.
    blend = {"kl_scale": 0.5, "kl_decay": 0.0} if "lambda" in loss_type else {}

    def loss(draft_hidden):
        return mtp_loss(
            draft_hidden, **inputs, loss_type=loss_type, temperature=0.9, token_tile=2, vocab_tile=4, **blend
        ).loss

    assert torch.autograd.gradcheck(loss, (draft,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_e2e_tv_with_one_step_equals_tv():
    inputs = make_inputs(1, 11, 8, 90, lengths=[1] * 10 + [0], seed=3)
    e2e, e2e_grad = run(mtp_loss, inputs, loss_type="e2e_tv", token_tile=4, vocab_tile=32)
    tv, tv_grad = run(mtp_loss, inputs, loss_type="tv", token_tile=4, vocab_tile=32)
    torch.testing.assert_close(e2e.loss, tv.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(e2e_grad, tv_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(e2e.expected_accepted_length, 1 - tv.loss, atol=1e-6, rtol=0)


def test_e2e_tv_gradient_flows_through_later_steps():
    # One start position, two steps: loss = 1 - (alpha_0 + alpha_0 * alpha_1) / 2 with alpha_j = 1 - TV_j, so
    # step 0's TV is weighted by 1 + alpha_1 and step 1's by alpha_0, where plain TV weights both by 1.
    inputs = make_inputs(2, 1, 8, 40, seed=4)
    e2e, e2e_grad = run(mtp_loss, inputs, loss_type="e2e_tv", token_tile=1, vocab_tile=16)
    _, tv_grad = run(mtp_loss, inputs, loss_type="tv", token_tile=1, vocab_tile=16)
    alpha = e2e.acceptance
    torch.testing.assert_close(e2e_grad[0], (1 + alpha[1]) * tv_grad[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(e2e_grad[1], alpha[0] * tv_grad[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(e2e.loss, 1 - (alpha[0] + alpha[0] * alpha[1]) / 2)


def test_lk_alpha_rescales_the_tv_gradient_by_one_over_the_acceptance():
    # One draft step: lk_alpha = -log(1 - mean TV), so its gradient is mean TV's divided by the acceptance; and
    # e2e_lk_alpha = -log(1 - L_e2e_tv) over several steps.
    one_step = make_inputs(1, 12, 8, 60, lengths=[1] * 11 + [0], seed=6)
    lk, lk_grad = run(mtp_loss, one_step, loss_type="lk_alpha", token_tile=5, vocab_tile=16)
    tv, tv_grad = run(mtp_loss, one_step, loss_type="tv", token_tile=5, vocab_tile=16)
    torch.testing.assert_close(lk.loss, -torch.log(1 - tv.loss), atol=1e-6, rtol=0)
    torch.testing.assert_close(lk_grad, tv_grad / (1 - tv.loss), atol=1e-7, rtol=1e-5)
    chained = make_inputs(3, 7, 8, 60, lengths=[3, 2, 1, 3, 0, 2, 1], seed=7)
    e2e_lk, e2e_lk_grad = run(mtp_loss, chained, loss_type="e2e_lk_alpha", token_tile=5, vocab_tile=16)
    e2e, e2e_grad = run(mtp_loss, chained, loss_type="e2e_tv", token_tile=5, vocab_tile=16)
    torch.testing.assert_close(e2e_lk.loss, -torch.log(1 - e2e.loss), atol=1e-6, rtol=0)
    torch.testing.assert_close(e2e_lk_grad, e2e_grad / (1 - e2e.loss), atol=1e-7, rtol=1e-5)


def test_lk_lambda_moves_from_kl_to_tv_as_its_weight_decays():
    inputs = make_inputs(1, 12, 8, 60, lengths=[1] * 11 + [0], seed=8)
    kl, kl_grad = run(mtp_loss, inputs, loss_type="kl", token_tile=5, vocab_tile=16)
    tv, tv_grad = run(mtp_loss, inputs, loss_type="tv", token_tile=5, vocab_tile=16)
    for scale, decay in ((1.0, 0.0), (0.0, 1.0), (0.7, 2.0)):
        out, grad = run(
            mtp_loss, inputs, loss_type="lk_lambda", token_tile=5, vocab_tile=16, kl_scale=scale, kl_decay=decay
        )
        weight = scale * torch.exp(-decay * (1 - tv.loss))
        torch.testing.assert_close(out.loss, weight * kl.loss + (1 - weight) * tv.loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, weight * kl_grad + (1 - weight) * tv_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("scale", "decay"), [(-0.1, 1.0), (1.5, 1.0), (0.5, -1.0), (0.5, float("inf"))])
def test_bad_lambda_weights_raise(scale, decay):
    inputs = make_inputs(1, 2, 8, 20)
    with pytest.raises(ValueError, match=r"kl_scale must lie in|kl_decay must be"):
        mtp_loss(**inputs, loss_type="lk_lambda", kl_scale=scale, kl_decay=decay)


def test_identical_models_have_zero_divergence_and_full_acceptance():
    inputs = make_inputs(3, 4, 8, 60, lengths=[3, 2, 1, 0], seed=5)
    inputs["target_hidden"] = inputs["draft_hidden"].detach().clone()
    for loss_type in ("kl", "rkl", "tv", "e2e_tv", "lk_alpha", "lk_lambda", "e2e_lk_alpha", "e2e_lk_lambda"):
        out = mtp_loss(**inputs, loss_type=loss_type, token_tile=3, vocab_tile=16)
        torch.testing.assert_close(out.loss, torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.acceptance, torch.ones(3), atol=1e-6, rtol=0)
        # Start positions with 3, 2 and 1 valid steps accept all of them.
        torch.testing.assert_close(out.expected_accepted_length, torch.tensor(2.0), atol=1e-6, rtol=0)


def test_step_without_valid_slot_has_nan_statistics():
    inputs = make_inputs(3, 4, 8, 30, lengths=[2, 1, 2, 0], seed=6)
    out = mtp_loss(**inputs, loss_type="tv")
    assert torch.isnan(out.tv[2]) and torch.isnan(out.acceptance[2])
    assert torch.isfinite(out.tv[:2]).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_frozen_inputs_get_no_gradient(loss_type):
    inputs = make_inputs(2, 5, 8, 40, lengths=[2, 1, 2, 2, 1], seed=7)
    inputs["lm_head_weight"].requires_grad_()
    inputs["target_hidden"].requires_grad_()
    mtp_loss(**inputs, loss_type=loss_type, token_tile=4, vocab_tile=16).loss.backward()
    assert inputs["draft_hidden"].grad is not None and inputs["draft_hidden"].grad.abs().sum() > 0
    assert inputs["lm_head_weight"].grad is None
    assert inputs["target_hidden"].grad is None


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_grad_gives_the_same_values(loss_type):
    inputs = make_inputs(3, 7, 8, 50, lengths=[3, 1, 2, 3, 0, 1, 2], seed=8)
    with_grad = mtp_loss(**inputs, loss_type=loss_type, token_tile=4, vocab_tile=16)
    with torch.no_grad():
        without_grad = mtp_loss(**inputs, loss_type=loss_type, token_tile=4, vocab_tile=16)
    assert not without_grad.loss.requires_grad
    assert_close_outputs(without_grad, with_grad, atol=0)


def test_statistics_are_detached_and_shaped():
    inputs = make_inputs(4, 6, 8, 40, seed=9)
    out = mtp_loss(**inputs, loss_type="kl")
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.tv.shape == out.acceptance.shape == (4,)
    assert out.expected_accepted_length.shape == ()
    assert not (out.tv.requires_grad or out.acceptance.requires_grad or out.expected_accepted_length.requires_grad)
    torch.testing.assert_close(out.acceptance, 1 - out.tv)


def test_module_wraps_function():
    inputs = make_inputs(2, 5, 8, 40, seed=10)
    criterion = MTPLoss(loss_type="rkl", temperature=0.5, token_tile=3, vocab_tile=16)
    module_out = criterion(inputs["draft_hidden"], inputs["target_hidden"], inputs["lm_head_weight"])
    function_out = mtp_loss(**inputs, loss_type="rkl", temperature=0.5)
    assert_close_outputs(module_out, function_out, atol=1e-6)
    assert "rkl" in repr(criterion)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor produced by any torch function or tensor method called from Python."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple | list) else (result,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return result


def _largest_tensors(fn, inputs: dict, **kwargs) -> tuple[int, int]:
    """Largest tensor created in forward and backward, and largest tensor saved for backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with _LargestTensor() as largest, saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(**inputs, **kwargs).loss.backward()
    return largest.numel, max(saved, default=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_memory_stays_within_a_tile(loss_type):
    num_steps, num_positions, hidden, vocab = 2, 32, 8, 1024
    token_tile, vocab_tile = 32, 256
    inputs = make_inputs(num_steps, num_positions, hidden, vocab, seed=11)
    full_logits = num_steps * num_positions * vocab
    created, saved = _largest_tensors(
        mtp_loss, inputs, loss_type=loss_type, token_tile=token_tile, vocab_tile=vocab_tile
    )
    # Views of the inputs (e.g. the detached lm_head weight) are the only tensors allowed beyond a tile.
    assert created <= max(token_tile * vocab_tile, vocab * hidden)
    # One [slots, H] gradient per per-slot value: two (KL and TV) for the lambda forms.
    components = 2 if "lambda" in loss_type else 1
    assert saved <= components * num_steps * num_positions * hidden
    # The same probe sees the reference's full logits, so it would catch a materialising implementation.
    created, saved = _largest_tensors(mtp_loss_reference, inputs, loss_type=loss_type)
    assert created >= full_logits and saved >= full_logits


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss_type": "mse"}, "Unknown loss_type"),
        ({"draft_hidden": torch.randn(4, 8)}, r"draft_hidden must be \[S, N, H\]"),
        ({"target_hidden": torch.randn(2, 4, 8)}, "target_hidden has shape"),
        ({"lm_head_weight": torch.randn(30, 7)}, "lm_head_weight must be"),
        ({"lm_head_weight": torch.randn(8, 30)}, "not its transpose"),
        ({"mask": torch.ones(3, 4, dtype=torch.bool)}, "mask must be a bool tensor of shape"),
        ({"mask": torch.ones(2, 5)}, "mask must be a bool tensor of shape"),
        ({"mask": torch.tensor([[True, False, True, True, True], [True, True, False, True, True]])}, "prefix-closed"),
        ({"mask": torch.zeros(2, 5, dtype=torch.bool)}, "no valid slot"),
        ({"labels": None}, "needs labels"),
        ({"labels": torch.zeros(5, 2, dtype=torch.long)}, "labels must be an integer tensor of shape"),
        ({"labels": torch.zeros(2, 5)}, "labels must be an integer tensor of shape"),
        ({"labels": torch.full((2, 5), 30)}, r"must lie in \[0, 30\)"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"token_tile": 0}, "must be positive"),
        ({"backend": "cuda"}, "Unknown backend"),
    ],
)
def test_bad_input_raises(change, message):
    inputs = make_inputs(2, 5, 8, 30, seed=12)
    arguments = {**inputs, "loss_type": "ce", **change}
    with pytest.raises(ValueError, match=message):
        mtp_loss(**arguments)


def pretend_triton_is_installed(monkeypatch, installed: bool = True) -> None:
    """Makes `importlib.util.find_spec("triton")` answer as if Triton were (or were not) installed."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed else None) if name == "triton" else real_find_spec(name, *a),
    )


def test_cpu_inputs_use_torch_path_without_importing_triton(monkeypatch):
    # Even with Triton installed and its interpreter on, "auto" keeps CPU inputs on the PyTorch path and leaves the
    # kernels unimported.
    pretend_triton_is_installed(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "bebop_trl.ops.triton_kernels", raising=False)
    select = mtp_loss_module._select_backend
    assert select("auto", torch.device("cpu"), torch.float32) == "torch"
    assert select("auto", torch.device("cuda"), torch.float32) == "triton"
    assert select("auto", torch.device("cuda"), torch.float64) == "torch"
    assert select("torch", torch.device("cuda"), torch.float32) == "torch"
    mtp_loss(**make_inputs(2, 3, 8, 20, seed=13), loss_type="tv")
    assert "bebop_trl.ops.triton_kernels" not in sys.modules


def test_auto_backend_without_triton_is_torch(monkeypatch):
    pretend_triton_is_installed(monkeypatch, installed=False)
    assert mtp_loss_module._select_backend("auto", torch.device("cuda"), torch.float32) == "torch"


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    pretend_triton_is_installed(monkeypatch)
    select = mtp_loss_module._select_backend
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"with Triton's interpreter \(TRITON_INTERPRET=1"):
        select("triton", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("triton", torch.device("cpu"), torch.float32) == "triton"
    pretend_triton_is_installed(monkeypatch, installed=False)
    with pytest.raises(ValueError, match="needs the triton package"):
        select("triton", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_backend_takes_float32_and_half_inputs_but_not_float64(monkeypatch, device, dtype):
    pretend_triton_is_installed(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tile_dtype = compute_dtype(torch.empty(0, dtype=dtype))
    if dtype == torch.float64:
        with pytest.raises(ValueError, match=r"float32, bfloat16 or float16 \(not float64\)"):
            mtp_loss_module._select_backend("triton", torch.device(device), tile_dtype)
    else:
        assert mtp_loss_module._select_backend("triton", torch.device(device), tile_dtype) == "triton"


def test_triton_backend_rejects_float64_inputs_before_importing_triton(monkeypatch):
    pretend_triton_is_installed(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "bebop_trl.ops.triton_kernels", raising=False)
    with pytest.raises(ValueError, match="not float64"):
        mtp_loss(**make_inputs(2, 3, 8, 20, dtype=torch.float64, seed=15), loss_type="tv", backend="triton")
    assert "bebop_trl.ops.triton_kernels" not in sys.modules


# The Triton kernels on CPU tensors under Triton's interpreter (make test-triton), and on CUDA (make test-gpu).
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.triton, id="interpreter"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]
# Out-of-row lanes of a kernel block compute -inf - (-inf) = NaN before they are masked out; on CPU the interpreter
# runs the kernels with numpy, which warns about it.
ignore_masked_lane_nan = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")


def require_triton(device: str) -> None:
    """Skips unless the Triton kernels can run on `device`, or fails if BEBOP_TRL_REQUIRE_TRITON=1.

    `make test-triton` sets BEBOP_TRL_REQUIRE_TRITON=1, so that a lane whose kernels never ran fails instead of
    passing on skips.
    """
    if importlib.util.find_spec("triton") is None:
        reason = "needs the triton package (make test-triton installs it)"
    elif device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "needs Triton's interpreter on CPU: TRITON_INTERPRET=1 in the environment (make test-triton sets it)"
    elif device == "cuda" and not torch.cuda.is_available():
        reason = "needs a CUDA device"
    else:
        return
    if os.environ.get("BEBOP_TRL_REQUIRE_TRITON") == "1":
        pytest.fail(f"BEBOP_TRL_REQUIRE_TRITON=1 but this test {reason}")
    pytest.skip(reason)


@ignore_masked_lane_nan
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_matches_reference_fp32(device, loss_type, case):
    require_triton(device)
    check_matches_reference_fp32(loss_type, case, backend="triton", device=device)


@ignore_masked_lane_nan
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_half_precision_matches_fp32_reference(device, loss_type, dtype):
    require_triton(device)
    check_half_precision_matches_fp32_reference(loss_type, dtype, backend="triton", device=device)
