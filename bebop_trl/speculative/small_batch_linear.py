"""A small-row matrix-product path for the `nn.Linear` layers of the engine's forward passes.

A decode step, a draft step and a verify pass multiply every weight by only a few rows (batch x new tokens). With so
few rows, CPU BLAS libraries can be faster computing `(W @ x.T).T` (the weight as the left operand) than
`F.linear(x, W)` (`x @ W.T`); how much, and whether at all, depends on the CPU, the thread count and the load, so
the path is opt-in and `benchmarks/bench_step_cost.py` measures it.

`small_batch_linear` applies the path to given modules
only, and only in the thread that entered it: the class `nn.Linear` and every other caller of the same modules (a
training step in another thread, say) keep `F.linear`.
"""

import contextlib
import threading
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


MAX_ROWS = 16
"""Inputs with at most this many rows (all dimensions but the last multiplied) take the `W @ x.T` path."""

_lock = threading.Lock()
# Per routed module, how many active contexts (over all threads) routed it; the last to leave restores it.
_routed: dict[nn.Linear, int] = {}
# Per thread, how many `small_batch_linear` contexts it is inside: the path is taken only where this is positive.
_thread = threading.local()


def _forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward`, with inputs of at most `MAX_ROWS` rows computed as `(W @ x.T).T` in routing threads."""
    rows = input.numel() // max(input.shape[-1], 1)
    if not getattr(_thread, "depth", 0) or rows > MAX_ROWS:
        return F.linear(input, self.weight, self.bias)
    # Contiguous output: the attention layers reshape it into heads, and later ops run faster on a plain layout.
    output = (self.weight @ input.reshape(rows, -1).T).T.contiguous()
    if self.bias is not None:
        output += self.bias
    return output.view(*input.shape[:-1], output.shape[-1])


@contextlib.contextmanager
def small_batch_linear(*modules: nn.Module | None) -> Iterator[None]:
    """Computes the `nn.Linear` layers inside `modules` with small inputs as `(W @ x.T).T` while the context is open.

    Only layers whose class uses `nn.Linear.forward` itself and that have no forward of their own set on the
    instance (as accelerate's hooks do) are routed; subclasses (quantized layers, say) are left alone. The results
    equal `F.linear`'s up to float rounding (the products are accumulated in another order). Everything is restored
    on exit, also after an exception; contexts may nest and several threads may route the same modules.

    Args:
        modules: Modules whose `nn.Linear` submodules (themselves included) to route; `None` entries are skipped.

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
    try:
        yield
    finally:
        _thread.depth -= 1
        with _lock:
            for module in linears:
                _routed[module] -= 1
                if not _routed[module]:
                    del _routed[module]
                    del module.forward
