"""Measurements with the speculative engine: acceptance per draft position, tokens per second, step costs, and the
speed-up that acceptance and step costs imply."""

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import MTPHead
from ..modeling.teacher_forcing import positions_from_mask
from ..rollout.torch_engine import left_pad
from ..speculative import GenerationOutput, SpeculativeGenerator, probs_from_logits, sample


@dataclass
class Tally:
    """Generated tokens, time and acceptance counts summed over several `generate` calls."""

    tokens: int = 0
    seconds: float = 0.0
    num_drafts: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    entropy_sum: float = 0.0

    def add(self, output: GenerationOutput, seconds: float = 0.0) -> None:
        """Adds one call's output (and its wall time)."""
        stats = output.stats
        tokens = int(output.completion_lengths.sum())
        self.tokens += tokens
        self.seconds += seconds
        self.entropy_sum += stats.mean_entropy * tokens
        self.num_drafts += stats.num_drafts
        counts = stats.accepted_per_position.tolist()
        previous = self.accepted_per_position or [0] * len(counts)
        self.accepted_per_position = [a + b for a, b in zip(previous, counts, strict=True)]

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of cycles whose j-th draft was accepted (so the first j drafts all were)."""
        return [count / max(self.num_drafts, 1) for count in self.accepted_per_position]

    def summary(self) -> dict[str, Any]:
        """JSON figures: tokens, seconds, tokens/s, mean entropy and, with drafts, the acceptance figures."""
        result: dict[str, Any] = {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
            "mean_entropy": self.entropy_sum / max(self.tokens, 1),
        }
        if self.num_drafts:
            k = len(self.accepted_per_position)
            accepted = sum(self.accepted_per_position)
            result.update(
                num_drafts=self.num_drafts,
                acceptance_per_position=self.acceptance_per_position,
                acceptance_rate=accepted / (self.num_drafts * k),
                mean_accepted_length=accepted / self.num_drafts,
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
        acceptance_per_position: [k] as for [`expected_tokens_per_cycle`][bebop_trl.quickstart.measure.expected_tokens_per_cycle].
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
        The [`Tally.summary`][bebop_trl.quickstart.measure.Tally.summary] of the run.
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

    Each repeat runs every batch with and without speculation back to back, the order flipping from one pair to
    the next, so that a burst of load on a shared machine hits both alike; what the noise cannot bias much is the
    ratio of the two.

    Args:
        batches: Prompt batches (token id lists), all of one batch size.
        repeats: Rounds over all batches.

    Returns:
        `plain` and `speculative` tallies (summaries), `speedup` (ratio of their tokens/s) and
        `speedup_per_repeat`.
    """
    engines = {
        "plain": SpeculativeGenerator(policy, None, num_speculative_tokens),
        "speculative": SpeculativeGenerator(policy, head, num_speculative_tokens, draft_sampling),
    }
    for engine in engines.values():  # untimed warm-up: first calls allocate
        _generate(engine, tokenizer, batches[0], min(4, max_new_tokens), temperature, seed)
    per_repeat = []
    totals = {name: Tally() for name in engines}
    with tqdm(total=2 * repeats * len(batches), desc=f"Speed, batch {len(batches[0])}", unit="run") as bar:
        for repeat in range(repeats):
            tallies = {name: Tally() for name in engines}
            for index, batch in enumerate(batches):
                names = list(engines) if (repeat + index) % 2 == 0 else list(reversed(engines))
                for name in names:
                    output, seconds = _timed(
                        policy.device,
                        _generate,
                        engines[name],
                        tokenizer,
                        batch,
                        max_new_tokens,
                        temperature,
                        seed + 1000 * repeat + index,
                    )
                    tallies[name].add(output, seconds)
                    totals[name].add(output, seconds)
                    bar.update()
            per_repeat.append(_ratio(tallies))
    return {
        **{name: tally.summary() for name, tally in totals.items()},
        "speedup": _ratio(totals),
        "speedup_per_repeat": per_repeat,
    }


@torch.no_grad()
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
    """Median seconds of the three steps a cycle is made of, after a prefill of `prompts` (one batch).

    - `decode`: a 1-token policy step with sampling (plain decoding's cost per token);
    - `verify`: a (k + 1)-token policy pass with its hidden states and distributions (the verifier's pass);
    - `draft`: one head step with the shared lm_head and sampling.

    The steps are interleaved over `repeats` rounds (after a warm-up round) and the caches are cropped back after
    each, so every timing starts from the same state.
    """
    device = policy.device
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    batch_size, k = input_ids.shape[0], num_speculative_tokens
    position_ids = positions_from_mask(attention_mask)
    policy_cache = DynamicCache(config=policy.config)
    prefill = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=policy_cache,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = prefill.hidden_states[-1]
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
            past_key_values=policy_cache,
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
        sample(probs_from_logits(head.compute_logits(out.last_hidden_state[:, 0]), temperature))
        head_cache.crop(-1)

    steps: dict[str, Callable[[], None]] = {
        "decode": lambda: policy_step(1),
        "verify": lambda: policy_step(k + 1),
        "draft": draft_step,
    }
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
            _, seconds = _timed(device, step)
            if round_index:  # round 0 is the warm-up
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


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
) -> GenerationOutput:
    device = engine.model.device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return engine.generate(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
    )


def _timed(device: torch.device, function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Runs `function(*args)` and returns its result and wall time (once the device has finished its work)."""
    _synchronize(device)
    started = time.perf_counter()
    result = function(*args)
    _synchronize(device)
    return result, time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ratio(tallies: Mapping[str, Tally]) -> float:
    speculative, plain = tallies["speculative"], tallies["plain"]
    return (speculative.tokens / speculative.seconds) / (plain.tokens / plain.seconds)
