"""A small-row matrix-product path for the `nn.Linear` layers of the engine's forward passes.

A decode step, a draft step and a verify pass multiply every weight by only a few rows (batch x new tokens). With so
few rows, CPU BLAS libraries can be faster computing `(W @ x.T).T` (the weight as the left operand) than
`F.linear(x, W)` (`x @ W.T`); how much, and whether at all, depends on the CPU, the thread count, the shape and the
number of rows (on one 2-core machine a 4-row product took half the time, an 8-row one 15% more), so the path is
opt-in, in two forms: every small product on the `W @ x.T` path, or each (weight shape, row count) on whichever
path was faster the first time it came up (`autotune`). `benchmarks/bench_step_cost.py` measures both.

`small_batch_linear` applies the path to given modules
only, and only in the thread that entered it: the class `nn.Linear` and every other caller of the same modules (a
training step in another thread, say) keep `F.linear`.
"""

import contextlib
import threading
import time
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


MAX_ROWS = 16
"""Inputs with at most this many rows (all dimensions but the last multiplied) take the `W @ x.T` path."""

_lock = threading.Lock()
# Per routed module, how many active contexts (over all threads) routed it; the last to leave restores it.
_routed: dict[nn.Linear, int] = {}
# Per thread, how many `small_batch_linear` contexts it is inside (the path is taken only where this is positive),
# and whether the innermost one autotunes.
_thread = threading.local()
# (out features, in features, rows, dtype, device type, threads) -> whether `W @ x.T` beat `F.linear` there.
_autotuned: dict[tuple, bool] = {}
# Timed calls of each path per decision (the fastest counts), after one untimed call each.
_AUTOTUNE_CALLS = 3
# `W @ x.T` must beat `F.linear` by this factor to be chosen: a near tie is noise, and `F.linear` is the default.
_AUTOTUNE_MARGIN = 0.9


def _weight_left(self: nn.Linear, input: torch.Tensor, rows: int) -> torch.Tensor:
    """`F.linear(input, W, b)` computed as `(W @ x.T).T`."""
    # Contiguous output: the attention layers reshape it into heads, and later ops run faster on a plain layout.
    output = (self.weight @ input.reshape(rows, -1).T).T.contiguous()
    if self.bias is not None:
        output += self.bias
    return output.view(*input.shape[:-1], output.shape[-1])


def _forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward`, with inputs of at most `MAX_ROWS` rows computed as `(W @ x.T).T` in routing threads
    (with autotuning, where that path was measured faster for the shape and row count)."""
    rows = input.numel() // max(input.shape[-1], 1)
    if not getattr(_thread, "depth", 0) or rows > MAX_ROWS:
        return F.linear(input, self.weight, self.bias)
    if getattr(_thread, "autotune", False) and not _weight_left_is_faster(self, input, rows):
        return F.linear(input, self.weight, self.bias)
    return _weight_left(self, input, rows)


def _weight_left_is_faster(module: nn.Linear, input: torch.Tensor, rows: int) -> bool:
    """Whether `(W @ x.T).T` beats `F.linear` for this weight shape and row count, timed on the first such input."""
    weight = module.weight
    key = (*weight.shape, rows, weight.dtype, weight.device.type, torch.get_num_threads())
    if key not in _autotuned:
        plain = _fastest(lambda: F.linear(input, weight, module.bias), weight.device)
        left = _fastest(lambda: _weight_left(module, input, rows), weight.device)
        _autotuned[key] = left < _AUTOTUNE_MARGIN * plain
    return _autotuned[key]


def _fastest(function: Callable[[], torch.Tensor], device: torch.device) -> float:
    """The shortest of `_AUTOTUNE_CALLS` timed calls of `function`, after an untimed one."""
    function()
    times = []
    for _ in range(_AUTOTUNE_CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


@contextlib.contextmanager
def small_batch_linear(*modules: nn.Module | None, autotune: bool = False) -> Iterator[None]:
    """Computes the `nn.Linear` layers inside `modules` with small inputs as `(W @ x.T).T` while the context is open.

    Only layers whose class uses `nn.Linear.forward` itself and that have no forward of their own set on the
    instance (as accelerate's hooks do) are routed; subclasses (quantized layers, say) are left alone. The results
    equal `F.linear`'s up to float rounding (the products are accumulated in another order). Everything is restored
    on exit, also after an exception; contexts may nest and several threads may route the same modules.

    Args:
        modules: Modules whose `nn.Linear` submodules (themselves included) to route; `None` entries are skipped.
        autotune: Take the `W @ x.T` path only for the (weight shape, row count) pairs where it was faster: each
            pair is timed on both paths the first time it comes up in the process (a few extra products), and the
            choice is kept.

    Example:
        ```python
        with small_batch_linear(policy, head):
            policy(input_ids=next_tokens, cache=cache, use_cache=True)
        ```
    """
    # A layer reachable from several of the modules is routed once.
    candidates = dict.fromkeys(
        module
        for root in modules
        if root is not None
        for module in root.modules()
        if type(module).forward is nn.Linear.forward
    )
    linears = []
    with _lock:
        for module in candidates:
            if module not in _routed:
                if "forward" in vars(module):
                    continue
                module.forward = types.MethodType(_forward, module)
            _routed[module] = _routed.get(module, 0) + 1
            linears.append(module)
    _thread.depth = getattr(_thread, "depth", 0) + 1
    outer_autotune = getattr(_thread, "autotune", False)
    _thread.autotune = autotune
    try:
        yield
    finally:
        _thread.depth -= 1
        _thread.autotune = outer_autotune
        with _lock:
            for module in linears:
                _routed[module] -= 1
                if not _routed[module]:
                    del _routed[module]
                    del module.forward
