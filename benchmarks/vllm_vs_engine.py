"""Acceptance per draft position of the shipped SmolLM2 head in vLLM against the torch engine, on the same prompts.

Both sides stop at the policy's EOS: the text a chat model writes after its end of turn is outside the head's training
data, so drafting past it (vLLM's `ignore_eos`) would measure a different workload on one side only.

Runs in the vLLM lane's environment, with vLLM's engine in this process and the package's fixes for the installed
build (`bebop_trl.vllm_plugin.compat`; none for a build without a known defect):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_vs_engine.py
"""

import argparse
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt at T = 1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-dir", default="outputs/vllm_vs_engine/draft")
    parser.add_argument("--output", default="benchmarks/results/vllm_vs_engine.json")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bebop_trl.embedded import load_smollm2, load_smollm2_head, smollm2_path
    from bebop_trl.modeling.vllm_export import vllm_speculative_config
    from bebop_trl.quickstart.settings import DEFAULT_TASK_CONFIG
    from bebop_trl.rollout.torch_engine import generate_from_ids
    from bebop_trl.rollout.vllm_backend import counts_from_llm_metrics
    from bebop_trl.tasks import reasoning_gym_dataset
    from bebop_trl.trainers.mtp_data import prompt_ids_of
    from bebop_trl.vllm_plugin import compat

    policy, tokenizer = load_smollm2()
    head = load_smollm2_head(policy)
    # Held-out questions of the task the shipped head was trained on.
    questions = reasoning_gym_dataset("basic_arithmetic", args.prompts, seed=7, **DEFAULT_TASK_CONFIG)
    prompts = prompt_ids_of(questions, tokenizer)
    folder = head.export_vllm(args.draft_dir)
    # Greedy decoding (T = 0) with greedy drafts is deterministic: both sides must emit the same tokens and accept
    # the same drafts, up to float ties. At T = 1 the two sample independently: rates agree within noise.
    runs = {"probabilistic": [1.0], "greedy": [1.0, 0.0]}
    results = {}
    for mode, temperatures in runs.items():
        config = vllm_speculative_config(head.config, folder, num_speculative_tokens=3, draft_sampling=mode)
        llm = LLM(smollm2_path(), speculative_config=config, enforce_eager=True, dtype="float32", seed=0,
                  max_model_len=512, disable_log_stats=False)  # fmt: skip
        for temperature in temperatures:
            samples = args.samples if temperature > 0 else 1
            params = SamplingParams(temperature=temperature, max_tokens=args.max_new_tokens, n=samples)
            with compat.shims_applied(compat.shims_for(compat.installed_vllm_build())):
                before = counts_from_llm_metrics(llm.get_metrics())
                outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
                counters = counts_from_llm_metrics(llm.get_metrics()) - before
            output = generate_from_ids(
                policy, tokenizer, [p for p in prompts for _ in range(samples)], head=head, num_speculative_tokens=3,
                draft_sampling=mode, max_new_tokens=args.max_new_tokens, temperature=temperature,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            vllm_completions = [list(o.token_ids) for out in outputs for o in out.outputs]
            engine_completions = output.unpadded(output.completion_ids)
            results[f"{mode}, T={temperature:g}"] = {
                "vllm": [a / counters.num_drafts for a in counters.accepted_per_position],
                "vllm_cycles": counters.num_drafts,
                "engine": output.stats.acceptance_per_position.tolist(),
                "engine_cycles": output.stats.num_drafts,
                "vllm_mean_length": sum(map(len, vllm_completions)) / len(vllm_completions),
                "engine_mean_length": output.completion_lengths.double().mean().item(),
                "identical_completions": sum(
                    a == b for a, b in zip(vllm_completions, engine_completions, strict=True)
                ),
                "completions": len(vllm_completions),
            }
        del llm
    print(
        "| drafting | vLLM pos 1 / 2 / 3 (cycles) | torch engine pos 1 / 2 / 3 (cycles) | mean length vLLM / engine "
        "| identical completions |\n|---|---|---|---|---|"
    )
    for run, r in results.items():
        vllm, engine = " / ".join(f"{a:.3f}" for a in r["vllm"]), " / ".join(f"{a:.3f}" for a in r["engine"])
        print(
            f"| {run} | {vllm} ({r['vllm_cycles']}) | {engine} ({r['engine_cycles']}) "
            f"| {r['vllm_mean_length']:.1f} / {r['engine_mean_length']:.1f} "
            f"| {r['identical_completions']} / {r['completions']} |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
