"""Measurements with the speculative engine: acceptance per draft position, tokens per second, step costs, and the
speed-up that acceptance and step costs imply."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import MTPHead
from ..speculative import AcceptanceCounts, GenerationOutput, SpeculativeGenerator
from ..speculative.step_costs import time_cycle_steps, timed
from .torch_engine import left_pad, padded_prompts


@dataclass
class Tally:
    """Generated tokens, time, policy entropy and acceptance counts summed over several `generate` calls."""

    tokens: int = 0
    seconds: float = 0.0
    entropy_sum: float = 0.0
    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    # How often a cycle drafted a j-th token: below `num_drafts` at later positions with a varying draft length.
    drafted_per_position: list[int] = field(default_factory=list)

    def add(self, output: GenerationOutput, seconds: float = 0.0) -> None:
        """Adds one call's output (and its wall time)."""
        stats = output.stats
        tokens = int(output.completion_lengths.sum())
        self.tokens += tokens
        self.seconds += seconds
        self.entropy_sum += stats.mean_entropy * tokens
        self.counts += stats.counts
        drafted = stats.drafted_per_position.tolist()
        earlier = self.drafted_per_position or [0] * len(drafted)
        self.drafted_per_position = [a + b for a, b in zip(earlier, drafted, strict=True)]

    def summary(self) -> dict[str, Any]:
        """JSON figures: tokens, seconds, tokens/s, mean entropy and, with drafts, the acceptance figures (and the
        rollout drafts' share of the draft cycles and their acceptance, where there were any)."""
        result: dict[str, Any] = {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
            "mean_entropy": self.entropy_sum / max(self.tokens, 1),
        }
        counts = self.counts
        if counts.num_drafts:
            result.update(
                num_drafts=counts.num_drafts,
                num_draft_tokens=counts.num_draft_tokens,
                drafted_per_position=self.drafted_per_position,
                acceptance_per_position=counts.acceptance_per_position,
                acceptance_rate=counts.acceptance_rate,
                accepted_drafts_per_cycle=counts.accepted_drafts_per_cycle,
            )
        if counts.num_rollout_drafts:
            result.update(
                rollout_draft_share=counts.num_rollout_drafts / counts.num_drafts,
                rollout_acceptance_rate=counts.num_rollout_accepted_tokens / counts.num_rollout_draft_tokens,
                rollout_accepted_per_cycle=counts.num_rollout_accepted_tokens / counts.num_rollout_drafts,
            )
        return result


def expected_tokens_per_cycle(acceptance_per_position: Sequence[float]) -> float:
    """Tokens one draft-and-verify cycle emits on average: the accepted drafts plus the verifier's own token.

    Args:
        acceptance_per_position: For j = 1..k, the probability that the first j drafts are all accepted (what
            [`AcceptanceStats.acceptance_per_position`][bebop_trl.speculative.AcceptanceStats] measures).
    """
    return 1.0 + sum(acceptance_per_position)


def implied_speedup_limit(acceptance_per_position: Sequence[float], relative_costs: Mapping[str, float]) -> float:
    """Speed-up over plain decoding that the acceptance and the step costs allow, with no other overhead.

    A cycle costs k draft steps plus one verify pass over k + 1 tokens; plain decoding emits one token per 1-token
    decode step. With costs in units of that decode step, the limit is E[tokens per cycle] / cycle cost.

    Args:
        acceptance_per_position: [k] as for [`expected_tokens_per_cycle`][bebop_trl.rollout.measure.expected_tokens_per_cycle].
        relative_costs: `draft` (one head step) and `verify` (one (k + 1)-token policy pass), each divided by the
            cost of a 1-token decode step at the same batch size.
    """
    k = len(acceptance_per_position)
    cycle_cost = k * relative_costs["draft"] + relative_costs["verify"]
    return expected_tokens_per_cycle(acceptance_per_position) / cycle_cost


def measure_acceptance(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: MTPHead,
    prompts: list[list[int]],
    *,
    draft_sampling: str,
    num_speculative_tokens: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Acceptance of `head` drafting for `policy` on `prompts`, measured with the real engine.

    Batch i is sampled with seed `seed + i`, so every head and mode sees the same prompts and random streams.

    Returns:
        The [`Tally.summary`][bebop_trl.rollout.measure.Tally.summary] of the run.
    """
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens, draft_sampling)
    tally = Tally()
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    for index, batch in enumerate(batches):
        output = _generate(engine, tokenizer, batch, max_new_tokens, temperature, seed + index)
        tally.add(output)
    return tally.summary()


def measure_engine_speed(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: MTPHead,
    batches: list[list[list[int]]],
    *,
    repeats: int,
    draft_sampling: str,
    num_speculative_tokens: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> dict[str, Any]:
    """Tokens per second of the engine with `head` and with no head, on the same batches, runs alternated.

    Returns:
        `plain` and `speculative` tallies (summaries), `speedup` (ratio of their tokens/s) and
        `speedup_per_repeat`; see [`compare_engine_speeds`][bebop_trl.rollout.measure.compare_engine_speeds].
    """
    engines = {
        "plain": SpeculativeGenerator(policy, None, num_speculative_tokens),
        "speculative": SpeculativeGenerator(policy, head, num_speculative_tokens, draft_sampling),
    }
    result = compare_engine_speeds(
        engines, tokenizer, batches, repeats=repeats, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    return {
        "plain": result["plain"],
        "speculative": result["speculative"],
        "speedup": result["speedup"]["speculative"],
        "speedup_per_repeat": result["speedup_per_repeat"]["speculative"],
    }


def compare_engine_speeds(
    engines: Mapping[str, SpeculativeGenerator],
    tokenizer: PreTrainedTokenizerBase,
    batches: list[list[list[int]]],
    *,
    repeats: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    warmup_batches: Sequence[list[list[int]]] = (),
    max_batch_size: int | None = None,
) -> dict[str, Any]:
    """Tokens per second of several engines on the same batches, runs interleaved, against the one named `plain`.

    Each repeat runs every batch on every engine back to back, the order rotating from one batch to the next, so
    that a burst of load on a shared machine hits all alike; what the noise cannot bias much is the ratio of two.
    Every engine sees the same random seed for a batch.

    Args:
        engines: Name -> engine; `plain` (no head) is the baseline.
        batches: Prompt batches (token id lists), all of one batch size.
        repeats: Rounds over all batches.
        warmup_batches: Batches every engine generates untimed first (other prompts than `batches`): engines that
            learn as they generate (the `"auto"` draft length, rollout drafts) are then timed in a steady state.
        max_batch_size: Rows decoded at once within a batch (continuous batching; default: the whole batch).

    Returns:
        One tally summary per engine, `speedup` (tokens/s over plain's, per engine) and `speedup_per_repeat`.
    """
    policy = engines["plain"].model
    for engine in engines.values():  # untimed warm-up: first calls allocate (and "auto" engines calibrate)
        _generate(engine, tokenizer, batches[0], min(4, max_new_tokens), temperature, seed, max_batch_size)
    for index, batch in enumerate(tqdm(warmup_batches, desc="Warm-up", unit="batch", disable=not warmup_batches)):
        for engine in engines.values():
            _generate(engine, tokenizer, batch, max_new_tokens, temperature, seed - 1 - index, max_batch_size)
    names = list(engines)
    per_repeat: dict[str, list[float]] = {name: [] for name in names if name != "plain"}
    totals = {name: Tally() for name in names}
    with tqdm(total=len(names) * repeats * len(batches), desc=f"Speed, batch {len(batches[0])}", unit="run") as bar:
        for repeat in range(repeats):
            tallies = {name: Tally() for name in names}
            for index, batch in enumerate(batches):
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    output, seconds = timed(
                        policy.device,
                        _generate,
                        engines[name],
                        tokenizer,
                        batch,
                        max_new_tokens,
                        temperature,
                        seed + 1000 * repeat + index,
                        max_batch_size,
                    )
                    tallies[name].add(output, seconds)
                    totals[name].add(output, seconds)
                    bar.update()
            for name in per_repeat:
                per_repeat[name].append(_ratio(tallies[name], tallies["plain"]))
    return {
        **{name: tally.summary() for name, tally in totals.items()},
        "speedup": {name: _ratio(totals[name], totals["plain"]) for name in per_repeat},
        "speedup_per_repeat": per_repeat,
    }


def measure_step_costs(
    policy: PreTrainedModel,
    head: MTPHead,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    num_speculative_tokens: int,
    temperature: float,
    repeats: int,
) -> dict[str, float]:
    """Median seconds of the three steps a k-draft cycle is made of, after a prefill of `prompts` (one batch):
    `decode` (a 1-token step), `verify` (the (k + 1)-token verify pass) and `draft` (one head step); see
    [`time_cycle_steps`][bebop_trl.speculative.step_costs.time_cycle_steps]."""
    input_ids, attention_mask = left_pad(prompts, pad_token_id, policy.device)
    verify = num_speculative_tokens + 1
    seconds = time_cycle_steps(
        policy, head, input_ids, attention_mask, verify_lengths=[verify], temperature=temperature, repeats=repeats
    )
    return {"decode": seconds["decode"], "verify": seconds[f"verify_{verify}"], "draft": seconds["draft"]}


def relative_step_costs(step_costs: Mapping[str, float]) -> dict[str, float]:
    """The draft and verify costs in units of one 1-token decode step."""
    return {name: step_costs[name] / step_costs["decode"] for name in ("draft", "verify")}


def _generate(
    engine: SpeculativeGenerator,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_batch_size: int | None = None,
) -> GenerationOutput:
    input_ids, attention_mask = padded_prompts(engine.model, tokenizer, prompts)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    return engine.generate(
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        generator=generator,
        max_batch_size=max_batch_size,
    )


def _ratio(tally: Tally, baseline: Tally) -> float:
    return (tally.tokens / tally.seconds) / (baseline.tokens / baseline.seconds)
