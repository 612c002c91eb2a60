"""What each step of a draft/verify cycle costs on SmolLM2-135M-Instruct, in units of one decode step.

With a cached prefix of `--cache-length` tokens, at each batch size, and for both linear paths of the engine
(`F.linear`, and the `small_batch_linear` option: `(W @ x.T).T` for inputs of at most 16 rows), it times:

- `engine verify n`: the engine's verify pass over n = 1..5 new tokens (policy forward with hidden states, processed
  distributions, rejection sampling, state update); n = 1 is the engine's plain sampling step;
- `forward n`: a bare Hugging Face forward of the same model over the same cache and n new tokens;
- `engine draft`: the engine's draft step with the shipped head (head forward, lm_head, sampling);
- `engine cycle k`: a whole k-token engine cycle (k draft steps, one verify pass over k + 1 tokens);
- `engine draft D=m`, `engine cycle k D=m`: the same with the head restricted to a draft vocabulary of m tokens
  (`--draft-vocab-size`; which tokens does not change the cost);
- `lm_head F.linear m`, `lm_head W @ x.T m`: the lm_head weight [V, H] times m = 1 and 4 rows, alone (the same
  operations under both paths: the spread of their time ratio around 1 shows the run's noise).

All steps run in turn over `--repeats` rounds after a warm-up round (so that load bursts on a shared machine hit
them alike) and every step restores the caches it grew; each cost is a median divided by the median of `forward 1`
of the same linear path. The cycle cost is `k * draft + verify(k + 1)`; the speed-up limits divide the tokens a
cycle emits (k + 1 with every draft accepted, or `1 + sum_j a_j` at the acceptances `--acceptance`) by that cost in
units of the engine's own 1-token step (plain sampling with the same engine).

Usage:
    python benchmarks/bench_step_cost.py [--threads 2] [--repeats 15] [--cache-length 100] [--batch-sizes 1 8]
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from bebop_trl.embedded import load_smollm2, load_smollm2_head
from bebop_trl.rollout.measure import implied_speedup_limit
from bebop_trl.speculative import SpeculativeGenerator
from bebop_trl.speculative.engine import _DecodeState, _SamplingParams
from bebop_trl.speculative.small_batch_linear import small_batch_linear
from bebop_trl.speculative.step_costs import interleaved_medians


# Acceptance per position (first j drafts accepted) of the shipped head, probabilistic drafting at T = 1, from the
# `make quickstart` run recorded in docs/benchmarks.md.
QUICKSTART_ACCEPTANCE = [0.430, 0.191, 0.060]
LINEAR_PATHS = {"F.linear": False, "small-batch": True}
MAX_NEW_TOKENS = 5


class StepBench:
    """The engine's decoding state after a prompt, and the steps to time on it (each leaves the state unchanged)."""

    def __init__(
        self,
        engine: SpeculativeGenerator,
        batch_size: int,
        cache_length: int,
        k: int,
        restricted: SpeculativeGenerator | None = None,
    ):
        # `restricted`: an engine whose head is `engine`'s restricted to a draft vocabulary (same layers, so it runs
        # on the same head cache).
        self.engine, self.k, self.restricted = engine, k, restricted
        model = engine.model
        vocab_size = model.get_output_embeddings().weight.shape[0]
        # Costs do not depend on the token values: fixed random ids stand in for a prompt.
        ids = torch.randint(vocab_size, (batch_size, cache_length), generator=torch.Generator().manual_seed(0))
        self.sampling = _SamplingParams(1.0, 0, 1.0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            state, _ = engine._prefill(ids, torch.ones_like(ids), self.sampling)
            # The state after a cycle that kept one slot: the head has caught up on all slots but the newest, so
            # that the next draft step is a single head step.
            newest = {
                name: getattr(state, name)[:, -1:] for name in ("pending_hidden", "pending_ids", "pending_positions")
            }
            older = {name: getattr(state, name)[:, :-1] for name in newest}
            engine._draft(
                dataclasses.replace(
                    state,
                    attention_mask=state.attention_mask[:, :-1],
                    pending_newest=state.pending_newest - 1,
                    **older,
                ),
                1,
                self.sampling,
            )
        self.state = dataclasses.replace(state, pending_newest=torch.zeros_like(state.next_token), **newest)
        self.draft_tokens = torch.randint(
            vocab_size, (batch_size, MAX_NEW_TOKENS - 1), generator=self.sampling.generator
        )
        logits = torch.randn(batch_size, MAX_NEW_TOKENS - 1, vocab_size, generator=self.sampling.generator)
        self.draft_probs = self.sampling.probs(logits)
        self.lm_head_weight = model.get_output_embeddings().weight.detach()
        self.rows = {m: torch.randn(m, self.lm_head_weight.shape[1]) for m in (1, 4)}

    @contextlib.contextmanager
    def _restored(self) -> Iterator[_DecodeState]:
        """Yields a shallow copy of the state and crops both caches back to their lengths afterwards."""
        lengths = [cache.get_seq_length() for cache in (self.state.policy_cache, self.state.head_cache)]
        try:
            yield dataclasses.replace(self.state)
        finally:
            for cache, length in zip((self.state.policy_cache, self.state.head_cache), lengths, strict=True):
                if cache.get_seq_length() > length:
                    cache.crop(length - cache.get_seq_length())

    def forward(self, num_tokens: int) -> None:
        state = self.state
        batch_size = state.next_token.shape[0]
        with self._restored():
            self.engine.model(
                input_ids=torch.cat([state.next_token.unsqueeze(-1), self.draft_tokens[:, : num_tokens - 1]], dim=-1),
                attention_mask=torch.cat(
                    [state.attention_mask, state.attention_mask.new_ones(batch_size, num_tokens)], dim=-1
                ),
                position_ids=state.position.unsqueeze(-1) + torch.arange(num_tokens),
                past_key_values=state.policy_cache,
                use_cache=True,
            )

    def verify(self, num_tokens: int) -> None:
        with self._restored() as state:
            drafts = num_tokens - 1
            self.engine._verify(state, self.draft_tokens[:, :drafts], self.draft_probs[:, :drafts], self.sampling)

    def draft(self, engine: SpeculativeGenerator) -> None:
        with self._restored() as state:
            engine._draft(state, 1, self.sampling)

    def cycle(self, engine: SpeculativeGenerator) -> None:
        with self._restored() as state:
            engine._decode_cycle(state, self.k, self.sampling)

    def steps(self) -> dict[str, Callable[[], Any]]:
        """Name -> step, for one linear path."""
        steps: dict[str, Callable[[], Any]] = {}
        for n in range(1, MAX_NEW_TOKENS + 1):
            steps[f"engine verify {n}"] = lambda n=n: self.verify(n)
            steps[f"forward {n}"] = lambda n=n: self.forward(n)
        steps["engine draft"] = lambda: self.draft(self.engine)
        steps[f"engine cycle k={self.k}"] = lambda: self.cycle(self.engine)
        if self.restricted is not None:
            size = self.restricted.head.config.draft_vocab_size
            steps[f"engine draft D={size}"] = lambda: self.draft(self.restricted)
            steps[f"engine cycle k={self.k} D={size}"] = lambda: self.cycle(self.restricted)
        for m, x in self.rows.items():
            steps[f"lm_head F.linear {m}"] = lambda x=x: F.linear(x, self.lm_head_weight)
            steps[f"lm_head W @ x.T {m}"] = lambda x=x: (self.lm_head_weight @ x.T).T
        return steps


def routed(engines: list[SpeculativeGenerator], step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` run with the small-batch linear path on the engines' models and heads (entering the context is part of
    the timed cost)."""

    def run() -> Any:
        with small_batch_linear(engines[0].model, *(engine.head for engine in engines)):
            return step()

    return run


def summarize(medians: dict[str, float], k: int, acceptance: list[float]) -> dict[str, Any]:
    """Costs in decode steps (`forward 1`), the k-cycle cost and the speed-up limits of one linear path."""
    unit = medians["forward 1"]
    costs = {name: seconds / unit for name, seconds in medians.items()}
    cycle = k * costs["engine draft"] + costs[f"engine verify {k + 1}"]
    plain_step = costs["engine verify 1"]
    relative = {"draft": costs["engine draft"] / plain_step, "verify": costs[f"engine verify {k + 1}"] / plain_step}
    return {
        "seconds": medians,
        "decode_steps": costs,
        "cycle_cost": cycle,
        "speedup_limit_all_accepted": implied_speedup_limit([1.0] * k, relative),
        "speedup_limit_at_acceptance": implied_speedup_limit(acceptance, relative),
    }


def markdown(results: dict[str, dict[str, Any]], k: int) -> str:
    """One table per batch size: every step's cost per linear path, and the small-batch path's time against F.linear's."""
    lines = []
    for batch, by_path in results.items():
        plain, small = by_path["F.linear"], by_path["small-batch"]
        lines += [
            f"\nBatch {batch} (cost in 1-token forwards of the same path; last column: small-batch / F.linear time)\n",
            "| step | F.linear | small-batch | time ratio |",
            "| --- | --- | --- | --- |",
        ]
        for name in plain["decode_steps"]:
            ratio = small["seconds"][name] / plain["seconds"][name]
            lines.append(
                f"| {name} | {plain['decode_steps'][name]:.2f} | {small['decode_steps'][name]:.2f} | {ratio:.2f} |"
            )
        lines.append(
            f"| cycle k={k} ({k} x draft + verify {k + 1}) | {plain['cycle_cost']:.2f} | {small['cycle_cost']:.2f} | |"
        )
        for key, label in (
            ("speedup_limit_all_accepted", "all drafts accepted"),
            ("speedup_limit_at_acceptance", "at the quickstart acceptance"),
        ):
            lines.append(f"| speed-up limit, {label} | {plain[key]:.2f}x | {small[key]:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--repeats", type=int, default=15, help="Timed rounds (medians are taken over them).")
    parser.add_argument("--cache-length", type=int, default=100, help="Tokens in the cache before each step.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=3, help="Draft tokens per cycle.")
    parser.add_argument(
        "--acceptance", type=float, nargs="+", default=QUICKSTART_ACCEPTANCE,
        help="P(first j drafts accepted) for j = 1..k, for the second speed-up limit.",
    )  # fmt: skip
    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        default=1024,
        help="Also time the head restricted to this many tokens (0: not).",
    )
    parser.add_argument("--output", default="benchmarks/results/step_cost.json")
    args = parser.parse_args()
    if len(args.acceptance) != args.k:
        parser.error(f"--acceptance needs {args.k} values (one per draft position).")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_smollm2()
    engine = SpeculativeGenerator(model, load_smollm2_head(model), num_speculative_tokens=args.k)
    engine.head.eval()
    restricted = None
    if args.draft_vocab_size:
        head = engine.head.with_draft_vocab(torch.arange(args.draft_vocab_size))
        restricted = SpeculativeGenerator(model, head, num_speculative_tokens=args.k)
    results: dict[str, dict[str, Any]] = {}
    for batch_size in args.batch_sizes:
        bench = StepBench(engine, batch_size, args.cache_length, args.k, restricted)
        steps = bench.steps()
        timed = {
            f"{path}: {name}": routed([engine, *([restricted] if restricted else [])], step) if on else step
            for path, on in LINEAR_PATHS.items()
            for name, step in steps.items()
        }
        with torch.no_grad():
            medians = interleaved_medians(timed, model.device, args.repeats)
        results[str(batch_size)] = {
            path: summarize({name: medians[f"{path}: {name}"] for name in steps}, args.k, args.acceptance)
            for path in LINEAR_PATHS
        }
        print(f"batch {batch_size} done", flush=True)

    print(markdown(results, args.k))
    result = dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        head="shipped (bebop_trl/heads/SmolLM2-135M-Instruct)",
        cache_length=args.cache_length,
        k=args.k,
        acceptance=args.acceptance,
        repeats=args.repeats,
        torch_threads=torch.get_num_threads(),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__),
        results=results,
    )
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
