"""What each step of a draft/verify cycle costs on SmolLM2-135M-Instruct, in units of one decode step.

With a cached prefix of `--cache-length` tokens, at each batch size, and for the three linear paths of the engine
(`F.linear`; the `small_batch_linear=True` option: `(W @ x.T).T` for every input of at most 16 rows; and
`small_batch_linear="auto"`: that path only for the weight shapes and row counts where it timed faster), it times:

- `engine verify n`: the engine's verify pass over n = 1..5 new tokens (policy forward with hidden states, processed
  distributions, rejection sampling, state update); n = 1 is the engine's plain sampling step;
- `forward n`: a bare Hugging Face forward of the same model over the same cache and n new tokens;
- `engine draft`: the engine's draft step with the shipped head (head forward, lm_head, sampling);
- `engine cycle k`: a whole k-token engine cycle (k draft steps, one verify pass over k + 1 tokens);
- `engine draft D=m`, `engine cycle k D=m`: the same with a full-vocabulary head restricted to a draft vocabulary of
  m tokens (`--draft-vocab-size`; which tokens does not change the cost); the shipped head has its own;
- `lm_head F.linear m`, `lm_head W @ x.T m`: the lm_head weight [V, H] times m = 1 and 4 rows, alone (the same
  operations under both paths: the spread of their time ratio around 1 shows the run's noise).

All steps run in turn over `--repeats` rounds after a warm-up round (so that load bursts on a shared machine hit
them alike) and every step restores the caches it grew; the tables divide each median by the median of `forward 1`
with `F.linear`, and give each path's time against `F.linear`'s. The cycle cost is `k * draft + verify(k + 1)`; the speed-up limits divide the tokens a
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
from bebop_trl.speculative.engine import _Batch, _Completions, _Drafts, _Queue, _SamplingParams
from bebop_trl.speculative.slot_cache import SlotCache
from bebop_trl.speculative.small_batch_linear import small_batch_linear
from bebop_trl.speculative.step_costs import interleaved_medians


# Acceptance per position (first j drafts accepted) of the shipped head, probabilistic drafting at T = 1, from the
# `make quickstart` run recorded in docs/benchmarks.md.
QUICKSTART_ACCEPTANCE = [0.430, 0.191, 0.060]
# The engine's `small_batch_linear` settings: off, every small product as `W @ x.T`, or per shape and row count.
LINEAR_PATHS = {"F.linear": False, "small-batch": True, "auto": "auto"}
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
        # Costs do not depend on the token values: fixed random ids stand in for distinct prompts.
        ids = torch.randint(vocab_size, (batch_size, cache_length), generator=torch.Generator().manual_seed(0))
        self.sampling = _SamplingParams(1.0, 0, 1.0, torch.Generator().manual_seed(0))
        # The rows as the engine admits them: the prompts in both caches, the newest slot pending for the head, so
        # that the next draft step is one catch-up step.
        queue = _Queue(ids, torch.ones_like(ids))
        completions = _Completions(batch_size, MAX_NEW_TOKENS, k, 0, torch.tensor([], dtype=torch.long))
        self.batch = _Batch(
            requests=torch.zeros(batch_size, dtype=torch.long),
            policy_cache=SlotCache(engine._num_layers, batch_size, cache_length + 2 * MAX_NEW_TOKENS, "cpu"),
            head_cache=SlotCache(len(engine.head.model.layers), batch_size, cache_length + 2 * MAX_NEW_TOKENS, "cpu"),
            next_token=torch.zeros(batch_size, dtype=torch.long),
        )
        with torch.no_grad():
            engine._refill(
                self.batch, torch.ones(batch_size, dtype=torch.bool), queue, completions, self.sampling, None
            )
        self.draft_tokens = torch.randint(
            vocab_size, (batch_size, MAX_NEW_TOKENS - 1), generator=self.sampling.generator
        )
        logits = torch.randn(batch_size, MAX_NEW_TOKENS - 1, vocab_size, generator=self.sampling.generator)
        self.draft_probs = self.sampling.probs(logits)
        self.lm_head_weight = model.get_output_embeddings().weight.detach()
        self.rows = {m: torch.randn(m, self.lm_head_weight.shape[1]) for m in (1, 4)}

    @contextlib.contextmanager
    def _restored(self) -> Iterator[_Batch]:
        """Yields a copy of the rows' state and puts the caches back to their lengths afterwards (slots past a row's
        length are never read, so that undoes every step)."""
        batch = self.batch
        lengths = [cache.lengths.clone() for cache in (batch.policy_cache, batch.head_cache)]
        try:
            yield dataclasses.replace(batch)
        finally:
            for cache, length in zip((batch.policy_cache, batch.head_cache), lengths, strict=True):
                cache.lengths = length
                cache.discard()

    def forward(self, num_tokens: int) -> None:
        with self._restored() as batch:
            cache = batch.policy_cache
            mask = cache.open(num_tokens)
            self.engine.model(
                input_ids=torch.cat([batch.next_token.unsqueeze(-1), self.draft_tokens[:, : num_tokens - 1]], dim=-1),
                attention_mask=mask,
                position_ids=cache.write_positions,
                past_key_values=cache,
                use_cache=True,
            )

    def verify(self, num_tokens: int) -> None:
        with self._restored() as batch:
            drafts = num_tokens - 1
            tokens = self.draft_tokens[:, :drafts]
            self.engine._verify(
                batch,
                _Drafts(
                    tokens,
                    self.draft_probs[:, :drafts],
                    torch.full_like(batch.next_token, drafts),
                    torch.ones_like(batch.next_token, dtype=torch.bool),
                ),
                self.sampling,
            )

    def draft(self, engine: SpeculativeGenerator) -> None:
        with self._restored() as batch:
            engine._draft(batch, 1, self.sampling, None)

    def cycle(self, engine: SpeculativeGenerator) -> None:
        with self._restored() as batch:
            engine._decode_cycle(batch, self.k, self.sampling, None)

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


def routed(engines: list[SpeculativeGenerator], step: Callable[[], Any], autotune: bool) -> Callable[[], Any]:
    """`step` run with a small-batch linear path on the engines' models and heads (entering the context is part of
    the timed cost)."""

    def run() -> Any:
        with small_batch_linear(engines[0].model, *(engine.head for engine in engines), autotune=autotune):
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
    """One table per batch size: every step's cost per linear path, and each small-row path's time against F.linear's."""
    lines = []
    paths = list(LINEAR_PATHS)
    for batch, by_path in results.items():
        plain = by_path["F.linear"]
        lines += [
            f"\nBatch {batch} (cost in 1-token forwards of F.linear; last columns: time against F.linear's)\n",
            "| step | " + " | ".join(paths) + " | " + " | ".join(f"{p} time" for p in paths[1:]) + " |",
            "| --- |" + " --- |" * (2 * len(paths) - 1),
        ]
        unit = plain["seconds"]["forward 1"]
        for name in plain["decode_steps"]:
            costs = [by_path[p]["seconds"][name] / unit for p in paths]
            ratios = [by_path[p]["seconds"][name] / plain["seconds"][name] for p in paths[1:]]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{c:.2f}" for c in costs)
                + " | "
                + " | ".join(f"{r:.2f}" for r in ratios)
                + " |"
            )
        cycles = [by_path[p]["cycle_cost"] * by_path[p]["seconds"]["forward 1"] / unit for p in paths]
        lines.append(
            f"| cycle k={k} ({k} x draft + verify {k + 1}) | "
            + " | ".join(f"{c:.2f}" for c in cycles)
            + " |"
            + " |" * (len(paths) - 1)
        )
        for key, label in (
            ("speedup_limit_all_accepted", "all drafts accepted"),
            ("speedup_limit_at_acceptance", "at the quickstart acceptance"),
        ):
            lines.append(
                f"| speed-up limit, {label} (own path) | "
                + " | ".join(f"{by_path[p][key]:.2f}x" for p in paths)
                + " |"
                + " |" * (len(paths) - 1)
            )
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
    if args.draft_vocab_size and engine.head.draft_vocab is None:
        head = engine.head.with_draft_vocab(torch.arange(args.draft_vocab_size))
        restricted = SpeculativeGenerator(model, head, num_speculative_tokens=args.k)
    results: dict[str, dict[str, Any]] = {}
    for batch_size in args.batch_sizes:
        bench = StepBench(engine, batch_size, args.cache_length, args.k, restricted)
        steps = bench.steps()
        timed = {
            f"{path}: {name}": routed([engine, *([restricted] if restricted else [])], step, on == "auto")
            if on
            else step
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
