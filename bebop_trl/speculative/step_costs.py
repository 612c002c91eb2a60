"""Timing the steps of a speculative cycle: a 1-token decode step, a head draft step and verify passes.

Costs are what the speed-up of speculation depends on (tokens per cycle over cycle cost), and they depend on the
machine, the batch size and the load, so they are measured rather than assumed: the quickstart and the benchmarks
report them, and [`AdaptiveDraftLength`][bebop_trl.speculative.draft_length.AdaptiveDraftLength] decides with them.
"""

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..modeling import MTPHead
from ..modeling.model_inputs import positions_from_mask, with_cache
from .sampling import probs_from_logits, sample


@torch.no_grad()
def time_cycle_steps(
    policy: torch.nn.Module,
    head: MTPHead,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    *,
    verify_lengths: Sequence[int],
    temperature: float,
    repeats: int,
) -> dict[str, float]:
    """Median seconds of the steps a cycle is made of, after a prefill of one left-padded batch.

    - `decode`: a 1-token policy step with sampling (plain decoding's cost per token);
    - `verify_n` for each n in `verify_lengths`: an n-token policy pass with its hidden states and distributions
      (the verifier's pass over the last token and n - 1 drafts);
    - `draft`: one head step with its lm_head and sampling.

    The steps are interleaved over `repeats` rounds (after a warm-up round) and the caches are cropped back after
    each, so every timing starts from the same state.
    """
    device = input_ids.device
    batch_size = input_ids.shape[0]
    position_ids = positions_from_mask(attention_mask)
    policy_cache = DynamicCache(config=policy.config)
    prefill = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(policy_cache),
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = head.policy_features(prefill.hidden_states)
    next_position = attention_mask.sum(dim=-1, keepdim=True)
    last_token = input_ids[:, -1:]
    # The head's cache as the engine leaves it after the prompt: slot t pairs hidden state t with token t + 1.
    head_cache = head.new_cache()
    head(
        hidden,
        torch.cat([input_ids[:, 1:], last_token], dim=-1),
        attention_mask=attention_mask,
        position_ids=position_ids + 1,
        past_key_values=head_cache,
        use_cache=True,
    )

    def policy_step(num_tokens: int) -> None:
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, num_tokens)], dim=-1)
        out = policy(
            input_ids=last_token.expand(-1, num_tokens),
            attention_mask=mask,
            position_ids=next_position + torch.arange(num_tokens, device=device),
            **with_cache(policy_cache),
            use_cache=True,
            output_hidden_states=num_tokens > 1,
        )
        probs = probs_from_logits(out.logits, temperature)
        if num_tokens == 1:
            sample(probs[:, -1])
        policy_cache.crop(-num_tokens)

    def draft_step() -> None:
        out = head(
            hidden[:, -1:],
            last_token,
            attention_mask=torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1),
            position_ids=next_position + 1,
            past_key_values=head_cache,
            use_cache=True,
        )
        # As the engine drafts: over the draft vocabulary only.
        sample(probs_from_logits(head.compute_draft_logits(out.last_hidden_state[:, 0]), temperature))
        head_cache.crop(-1)

    steps: dict[str, Callable[[], None]] = {"decode": lambda: policy_step(1), "draft": draft_step}
    for n in verify_lengths:
        steps[f"verify_{n}"] = functools.partial(policy_step, n)
    return interleaved_medians(steps, device, repeats)


def interleaved_medians(
    steps: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median wall seconds of each step, the steps run in turn over `repeats` timed rounds after a warm-up round.

    Interleaving makes a burst of load on a shared machine hit every step alike, so that ratios of the medians
    are far steadier than the times themselves. Each step must leave the state as it found it.

    Args:
        steps: Name -> function to time.
        device: Where the steps run (CUDA work is waited for).
        repeats: Timed rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            _, seconds = timed(device, step)
            if round_index:  # round 0 is the warm-up
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def timed(device: torch.device, function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Runs `function(*args)` and returns its result and wall time (once the device has finished its work)."""
    synchronize(device)
    started = time.perf_counter()
    result = function(*args)
    synchronize(device)
    return result, time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
