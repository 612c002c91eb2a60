"""Throughput of the speculative engine on SmolLM2-135M-Instruct, against Hugging Face `generate`.

Compares, at temperature 1 on chat prompts and side by side in one process (repeats interleaved so that machine
noise hits every configuration alike):

- `hf`: `model.generate(do_sample=True)`;
- `plain`: the engine without a head (the baseline every speed-up is measured against);
- `spec`: the engine with an MTP head, for k = 1..4 and both drafting modes.

It also measures the cost of a decode step, a draft step and a (k + 1)-token verify pass (as `make quickstart` does,
with `bebop_trl.rollout.measure`), and prints the speed-up that the measured acceptance allows with those costs:
a cycle emits `1 + sum_j P(first j drafts accepted)` tokens for `k * c_draft + c_verify(k + 1)`, against `c_decode`
per token without a head.

Usage:
    BEBOP_TRL_CACHE=/tmp/bebop-cache python benchmarks/bench_engine.py [--quick] [--head PATH] [--output FILE]
"""

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from bebop_trl.embedded import load_smollm2
from bebop_trl.modeling import MTPHead
from bebop_trl.rollout.measure import implied_speedup_limit, measure_step_costs, relative_step_costs
from bebop_trl.speculative import AcceptanceCounts, SpeculativeGenerator


QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about the ocean.",
    "How do I reverse a list in Python?",
    "What are the benefits of regular exercise?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "What is 17 times 23?",
    "Suggest a name for a friendly robot.",
]


@dataclass
class Config:
    method: str  # "hf", "plain" or "spec"
    batch_size: int
    k: int = 0
    draft_sampling: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-k{self.k}-{self.draft_sampling}" if self.method == "spec" else self.method


@dataclass
class Measurement:
    tokens: int = 0
    seconds: float = 0.0
    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def chat_batches(tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of chat-templated questions; batch i starts at question i * batch_size (cyclically)."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [
        tokenizer(
            [texts[(i * batch_size + j) % len(texts)] for j in range(batch_size)],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        for i in range(len(texts))
    ]


def run_once(config: Config, model, head, batch, max_new_tokens: int, seed: int, measurement: Measurement) -> None:
    """Generates one batch with `config` and adds its tokens, time and acceptance counts to `measurement`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if config.method == "hf":
        output = model.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens
        )
        elapsed = time.perf_counter() - start
        completion = output[:, batch["input_ids"].shape[1] :]
        is_eos = completion == model.generation_config.eos_token_id
        ended = is_eos.any(-1)
        lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, completion.shape[1])
        measurement.tokens += int(lengths.sum())
    else:
        engine = SpeculativeGenerator(
            model, head if config.method == "spec" else None, max(config.k, 1), config.draft_sampling or "greedy"
        )
        output = engine.generate(
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            generator=generator,
        )
        elapsed = time.perf_counter() - start
        measurement.tokens += int(output.completion_lengths.sum())
        measurement.counts += output.stats.counts
    measurement.seconds += elapsed


def step_costs(model, head, batch, k: int, repeats: int) -> dict[str, float]:
    """Median seconds of a 1-token decode step, a (k + 1)-token verify pass and a draft step on `batch`."""
    prompts = [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    with torch.no_grad():
        return measure_step_costs(
            model, head, prompts, pad_token_id=model.generation_config.pad_token_id or 0, num_speculative_tokens=k,
            temperature=1.0, repeats=repeats,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", help="Folder or Hub id of a trained MTP head (default: a new, untrained head).")
    parser.add_argument("--output", default="benchmarks/results/engine.json", help="Where to write the JSON results.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4], help="Numbers of speculative tokens.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats of every configuration.")
    parser.add_argument(
        "--prompts-per-repeat", type=int, default=4, help="Prompts per configuration and repeat (at least one batch)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--quick", action="store_true", help="A short run: k in {1, 3}, 1 repeat, 24 tokens.")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.repeats, args.max_new_tokens, args.prompts_per_repeat = [1, 3], 1, 24, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    head = MTPHead.from_pretrained(args.head, policy=model) if args.head else MTPHead.from_model(model)
    head.eval()

    configs = []
    for batch_size in args.batch_sizes:
        configs += [Config("hf", batch_size), Config("plain", batch_size)]
        configs += [Config("spec", batch_size, k, mode) for k in args.ks for mode in ("probabilistic", "greedy")]
    batches = {b: chat_batches(tokenizer, b) for b in args.batch_sizes}
    measurements = {(c.batch_size, c.name): Measurement() for c in configs}

    # Warm-up: one short generation per configuration, untimed.
    for config in configs:
        run_once(config, model, head, batches[config.batch_size][0], 4, 0, Measurement())
    for repeat in range(args.repeats):
        for config in configs:
            all_batches = batches[config.batch_size]
            per_repeat = max(1, args.prompts_per_repeat // config.batch_size)
            for i in range(per_repeat):
                # Rotate through the prompts across repeats, the same ones for every configuration.
                batch = all_batches[(repeat * per_repeat + i) % len(all_batches)]
                seed = 1000 * repeat + i
                run_once(
                    config, model, head, batch, args.max_new_tokens, seed, measurements[config.batch_size, config.name]
                )
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    costs = {(b, k): step_costs(model, head, batches[b][0], k, repeats=15) for b in args.batch_sizes for k in args.ks}
    rows = []
    for config in configs:
        m = measurements[config.batch_size, config.name]
        hf = measurements[config.batch_size, "hf"].tokens_per_second
        plain = measurements[config.batch_size, "plain"].tokens_per_second
        row = dict(
            asdict(config),
            name=config.name,
            tokens=m.tokens,
            seconds=m.seconds,
            tokens_per_second=m.tokens_per_second,
            speedup_vs_hf=m.tokens_per_second / hf,
            speedup_vs_plain=m.tokens_per_second / plain,
        )
        if config.method == "spec":
            per_position = m.counts.acceptance_per_position
            limit = implied_speedup_limit(per_position, relative_step_costs(costs[config.batch_size, config.k]))
            row.update(
                acceptance_rate=m.counts.acceptance_rate,
                acceptance_per_position=per_position,
                accepted_drafts_per_cycle=m.counts.accepted_drafts_per_cycle,
                implied_speedup_limit=limit,
                fraction_of_limit=row["speedup_vs_plain"] / limit,
            )
        rows.append(row)

    header = f"{'batch':>5} {'config':<22} {'tok/s':>8} {'vs hf':>6} {'vs plain':>8} {'accept':>7} {'acc/pos':<34} {'limit':>6} {'of lim':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        spec = row["method"] == "spec"
        per_position = " ".join(f"{a:.4f}" for a in row["acceptance_per_position"]) if spec else ""
        print(
            f"{row['batch_size']:>5} {row['name']:<22} {row['tokens_per_second']:>8.1f} {row['speedup_vs_hf']:>6.2f} "
            f"{row['speedup_vs_plain']:>8.2f} "
            + (f"{row['acceptance_rate']:>7.4f} " if spec else f"{'':>7} ")
            + f"{per_position:<34} "
            + (f"{row['implied_speedup_limit']:>6.2f} {row['fraction_of_limit']:>6.2f}" if spec else "")
        )
    for (batch_size, k), c in costs.items():
        print(f"step costs, batch {batch_size}, k {k}: " + ", ".join(f"{n} {1000 * s:.1f} ms" for n, s in c.items()))

    result = dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        head=args.head or "untrained (MTPHead.from_model)",
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        torch_threads=torch.get_num_threads(),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__),
        step_costs_seconds={f"batch {b}, k {k}": c for (b, k), c in costs.items()},
        results=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
