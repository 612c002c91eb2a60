"""vLLM with the exported shipped SmolLM2 head against vLLM without it: tokens per second at batch 1.

One request at a time (batch 1), T = 1, probabilistic drafting, on prompts of the quickstart task held out from the
choice of the draft vocabulary (see `smollm2_task.py`); both sides stop at the policy's EOS. Each configuration
(plain, the full-vocabulary head with k = 1, 2, 3, and the head restricted to `--draft-vocab-size` tokens with
k = 1, 2, 3) builds its own `vllm.LLM` (float32, eager) in this process and generates every prompt after a
warm-up; the configurations run twice, the second pass in reverse order, so that drift on the machine hits them
alike. Speed-ups divide each configuration's tokens per second by plain vLLM's, both summed over the two passes.

Runs in the vLLM lane's environment:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_speed.py
"""

import argparse
import gc
import json
import os
import time

import torch
from smollm2_task import draft_vocab_from_samples, policy_samples, task_prompt_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="Held-out prompts, generated one at a time.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--draft-vocab-size", type=int, default=1024, help="0: the full-vocabulary head only.")
    parser.add_argument("--train-prompts", type=int, default=96, help="Prompts whose samples choose the subset.")
    parser.add_argument("--work-dir", default="outputs/bench_vllm_speed")
    parser.add_argument("--output", default="benchmarks/results/vllm_speed.json")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bebop_trl.embedded import load_smollm2, load_smollm2_head, smollm2_path
    from bebop_trl.modeling.vllm_export import vllm_speculative_config
    from bebop_trl.rollout.vllm_backend import counts_from_llm_metrics
    from bebop_trl.vllm_plugin import compat

    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy)
    train, held_out = task_prompt_split(tokenizer)
    prompts = held_out[: args.prompts]
    heads = {"full": head}
    if args.draft_vocab_size:
        samples = policy_samples(policy, tokenizer, train[: args.train_prompts])
        heads[f"D={args.draft_vocab_size}"] = head.with_draft_vocab(
            draft_vocab_from_samples(tokenizer, policy.config.vocab_size, samples, args.draft_vocab_size)
        )
    configs: dict[str, dict | None] = {"plain": None}
    for name, candidate in heads.items():
        folder = candidate.export_vllm(os.path.join(args.work_dir, name))
        for k in args.ks:
            configs[f"{name} k={k}"] = vllm_speculative_config(candidate.config, folder, num_speculative_tokens=k)
    del policy, heads, head
    gc.collect()

    params = SamplingParams(temperature=1.0, max_tokens=args.max_new_tokens, seed=0)
    totals = {name: {"tokens": 0, "seconds": 0.0, "num_drafts": 0, "accepted": [0] * max(args.ks)} for name in configs}
    build = compat.installed_vllm_build()
    with compat.shims_applied(compat.shims_for(build)):
        for order in (list(configs), list(reversed(configs))):
            for name in order:
                llm = LLM(
                    smollm2_path(),
                    speculative_config=configs[name],
                    skip_tokenizer_init=True,
                    dtype="float32",
                    max_model_len=512,
                    enforce_eager=True,
                    disable_log_stats=False,
                    seed=0,
                )
                llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
                before = counts_from_llm_metrics(llm.get_metrics())
                started = time.perf_counter()
                for prompt in prompts:
                    (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
                    totals[name]["tokens"] += len(output.outputs[0].token_ids)
                totals[name]["seconds"] += time.perf_counter() - started
                counters = counts_from_llm_metrics(llm.get_metrics()) - before
                totals[name]["num_drafts"] += counters.num_drafts
                for j, count in enumerate(counters.accepted_per_position[: max(args.ks)]):
                    totals[name]["accepted"][j] += count
                print(name, totals[name], flush=True)
                del llm
                gc.collect()

    plain = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    rows = {}
    for name, total in totals.items():
        drafts = max(total["num_drafts"], 1)
        rows[name] = {
            "tokens_per_second": total["tokens"] / total["seconds"],
            "speedup": total["tokens"] / total["seconds"] / plain,
            "acceptance_per_position": [count / drafts for count in total["accepted"]] if total["num_drafts"] else [],
            **total,
        }
    print("| vLLM | tokens/s | speed-up vs plain vLLM | acceptance per position |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        acceptance = " / ".join(f"{a:.3f}" for a in row["acceptance_per_position"]) or "-"
        print(f"| {name} | {row['tokens_per_second']:.1f} | {row['speedup']:.2f}x | {acceptance} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {"vllm": str(build), "threads": torch.get_num_threads(), "args": vars(args), "rows": rows}, f, indent=2
        )


if __name__ == "__main__":
    main()
