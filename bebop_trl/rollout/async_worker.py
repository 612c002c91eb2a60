"""Rollouts generated in a background thread from a snapshot of the policy, while the trainer trains."""

import copy
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling import MTPHead
from ..speculative import GenerationOutput
from .torch_engine import generate_from_ids


@dataclass
class AsyncRollout:
    """One round of rollouts generated in the background.

    Attributes:
        prompt_ids: The prompts, as token id lists.
        output: The engine's output.
        version: The policy version (optimizer step) of the snapshot that generated it.
        started: `time.perf_counter()` when generation started.
        finished: `time.perf_counter()` when it finished.
    """

    prompt_ids: list[list[int]]
    output: GenerationOutput
    version: int
    started: float
    finished: float


class AsyncRolloutWorker:
    """Generates one round of rollouts at a time in a background thread, from its own copy of the policy and head.

    `submit` copies the current weights into the snapshot (on the caller's thread, so the snapshot is one policy
    version) and starts generating; `take` returns the finished round if it was for the same prompts. PyTorch
    releases the GIL inside its kernels, so generation and training overlap.

    Args:
        policy: The (unwrapped) policy; the snapshot is a deep copy of it, made once.
        head: The draft head, or None for plain sampling; copied and bound to the snapshot.
        tokenizer: The policy's tokenizer (for the pad token).
        engine_kwargs: `num_speculative_tokens` and `draft_sampling` of the engine.
    """

    def __init__(self, policy: nn.Module, head: MTPHead | None, tokenizer: Any, **engine_kwargs: Any):
        self._snapshot = _independent_copy(policy)
        self._head = None
        if head is not None:
            # A new head, not a deep copy: the live head references the policy's embedding and lm_head. Its random
            # initialisation, overwritten at once, must not move the trainer's random stream.
            with torch.random.fork_rng(devices=[]):
                self._head = MTPHead(head.config).to(device=head.fc.weight.device, dtype=head.fc.weight.dtype)
            self._head.load_state_dict(head.state_dict())
            self._head.eval().requires_grad_(False).bind(self._snapshot, check_base_model=False)
        self._tokenizer = tokenizer
        self._engine_kwargs = engine_kwargs
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bebop-rollouts")
        self._pending: tuple[list[list[int]], Future] | None = None

    @torch.no_grad()
    def submit(
        self,
        prompt_ids: list[list[int]],
        policy: nn.Module,
        head: MTPHead | None,
        version: int,
        generator: torch.Generator | None = None,
        **generate_kwargs: Any,
    ) -> None:
        """Snapshots `policy` (and `head`) and starts generating for `prompt_ids` in the background.

        Args:
            prompt_ids: Prompt token ids.
            policy: The live policy, whose weights are copied into the snapshot.
            head: The live head (its weights are copied too), or None.
            version: The policy version the snapshot holds.
            generator: Random generator for the round.
            **generate_kwargs: Arguments of [`SpeculativeGenerator.generate`][bebop_trl.SpeculativeGenerator.generate].
        """
        self.discard()
        _copy_weights(policy, self._snapshot)
        if head is not None and self._head is not None:
            _copy_weights(head, self._head)
        future = self._executor.submit(self._generate, prompt_ids, version, generator, generate_kwargs)
        self._pending = (prompt_ids, future)

    def take(self, prompt_ids: list[list[int]]) -> AsyncRollout | None:
        """Waits for the pending round and returns it if it was generated for `prompt_ids`, else None."""
        if self._pending is None:
            return None
        pending_prompts, future = self._pending
        self._pending = None
        rollout = future.result()
        return rollout if pending_prompts == prompt_ids else None

    def discard(self) -> None:
        """Drops the pending round (after waiting for it: the snapshot must not change while it runs)."""
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None

    def close(self) -> None:
        """Drops the pending round and stops the thread."""
        self.discard()
        self._executor.shutdown(wait=True)

    def _generate(
        self, prompt_ids: list[list[int]], version: int, generator: torch.Generator | None, kwargs: dict[str, Any]
    ) -> AsyncRollout:
        started = time.perf_counter()
        output = generate_from_ids(
            self._snapshot,
            self._tokenizer,
            prompt_ids,
            head=self._head,
            generator=generator,
            **self._engine_kwargs,
            **kwargs,
        )
        return AsyncRollout(prompt_ids, output, version, started, time.perf_counter())


class Lookahead:
    """Iterates the trainer's epoch iterator, and lets the trainer read batches it has not reached yet.

    Whatever iterator the trainer uses (a fresh epoch, or the one that skips the batches of a resumed run), its
    batches come through here in order; `peek_after` pulls later ones into a buffer that `__next__` serves first.
    """

    def __init__(self, history: int):
        self._source: Iterator | None = None
        self._buffer: deque = deque()
        self._recent: deque = deque(maxlen=history)

    def wrap(self, iterator: Iterator) -> "Lookahead":
        if iterator is not self._source and iterator is not self:
            self._source, self._buffer = iterator, deque()
            self._recent.clear()
        return self

    def __iter__(self) -> "Lookahead":
        return self

    def __next__(self) -> Any:
        item = self._buffer.popleft() if self._buffer else next(self._source)
        self._recent.append(item)
        return item

    def peek_after(self, item: Any, distance: int) -> Any | None:
        """The batch `distance` positions after `item` (a recent batch), or None if the epoch ends first."""
        recent = list(self._recent)
        index = next((i for i in range(len(recent) - 1, -1, -1) if recent[i] is item), None)
        if index is None:
            return None
        ahead = distance - (len(recent) - 1 - index)  # position of the wanted batch after the last one served
        if ahead <= 0:
            return recent[index + distance]
        while len(self._buffer) < ahead:
            try:
                self._buffer.append(next(self._source))
            except StopIteration:
                return None
        return self._buffer[ahead - 1]


def _independent_copy(policy: nn.Module) -> nn.Module:
    """A deep copy of `policy` for inference that shares nothing with it.

    Trainers patch `forward` on the instance (TRL's fused log-prob forward closes over the original model's bound
    `forward`); a deep copy would keep calling the original model, so the copy falls back to its class's `forward`.
    """
    snapshot = copy.deepcopy(policy).eval().requires_grad_(False)
    for module in snapshot.modules():
        module.__dict__.pop("forward", None)
    return snapshot


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copies every parameter and buffer of `source` into the same-structured `target`."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    if source_state.keys() != target_state.keys():
        raise RuntimeError("The rollout snapshot no longer has the policy's structure; recreate the worker.")
    for name, tensor in target_state.items():
        tensor.copy_(source_state[name])
