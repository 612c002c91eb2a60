"""The loss study's heads scored analytically: expected acceptance under teacher forcing on one fixed held-out set.

`study_protocol.py` measures every head with the real engine on 64 completions, whose figures differ by one to three
points at position 1 between seeds of one loss. Here every head is scored on the same policy samples instead: 1 - TV(p, q) per draft
step (the probability that a draft at that step is accepted, given the earlier ones were) and the expected accepted
drafts per cycle, `sum_j prod_{i<=j} (1 - TV_i)` at k = 3, averaged over every completion position that a rollout
drafts from. The only randomness is in the samples, which all heads share, so differences between heads are free of
measurement noise.

The samples are the policy's completions at T = 1 (at most 128 tokens, `smollm2_task.policy_samples`, cached) of
`--prompts` held-out prompts (after the 64 that the study's engine measurements and learning curves use; the corpus
excludes the whole half), `--samples` each. Every head saved under `--work-dir` (and the base head) is scored, once:
a rerun scores only the heads that `--output` does not hold yet. The table (mean and standard deviation over seeds)
goes to stdout, the figures to `--output`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_analytic.py --base-head outputs/heads/smollm2-eagle3-ce
"""

import argparse
import glob
import json
import os
import statistics
from collections import defaultdict

import torch
from smollm2_task import policy_samples, task_prompt_split

from bebop_trl import MTPHead
from bebop_trl.embedded import load_smollm2
from bebop_trl.modeling.teacher_forcing import completion_token_mask, drafting_slots, policy_hidden_states
from bebop_trl.rollout import left_pad
from bebop_trl.trainers.head_loss import teacher_forced_head_loss


K = 3
FIRST_PROMPT = 64  # the study's learning curves use held-out prompts 0-31, its engine measurements 32-63


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-head", required=True, help="The head the fine-tuning stage started from.")
    parser.add_argument(
        "--work-dir", default="outputs/study_protocol", help="The study's heads: <stage>/<loss>-seed<s>."
    )
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4, help="Completions per prompt.")
    parser.add_argument("--batch-size", type=int, default=64, help="Sequences per forward pass.")
    parser.add_argument("--output", default="benchmarks/results/loss_study_analytic.json")
    return parser.parse_args()


@torch.no_grad()
def score(head: MTPHead, data: dict[str, torch.Tensor]) -> dict[str, object]:
    """1 - TV per draft step and the expected accepted drafts per cycle over every drafted slot of the set (scored as
    one batch, so the loss's own averages are the set's)."""
    out = teacher_forced_head_loss(
        head, data["input_ids"], data["hidden"], data["attention_mask"], num_steps=K, loss_type="tv",
        slot_mask=data["slot_mask"], aux_hidden=data["aux"] if head.aux_layers else None,
    )  # fmt: skip
    return {
        "acceptance_per_step": out.acceptance.tolist(),
        "expected_accepted_drafts_per_cycle": float(out.expected_accepted_length),
    }


@torch.no_grad()
def prepared_set(policy, tokenizer, sequences, prompt_lengths, aux_layers, batch_size) -> dict[str, torch.Tensor]:
    """The sequences left-padded into one batch, with the policy's hidden states (`batch_size` rows per forward
    pass) and the slots a rollout drafts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(sequences, pad)
    parts = [
        policy_hidden_states(policy, input_ids[i : i + batch_size], attention_mask[i : i + batch_size], aux_layers)
        for i in range(0, len(sequences), batch_size)
    ]
    is_completion = completion_token_mask(attention_mask, torch.tensor(prompt_lengths))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "hidden": torch.cat([hidden for hidden, _ in parts]),
        "aux": torch.cat([aux for _, aux in parts]) if aux_layers else None,
        "slot_mask": drafting_slots(is_completion, K),
    }


def main() -> None:
    args = parse_args()
    policy, tokenizer = load_smollm2()
    policy.eval()
    _, held_out = task_prompt_split(tokenizer)
    prompts = [p for p in held_out[FIRST_PROMPT : FIRST_PROMPT + args.prompts] for _ in range(args.samples)]
    completions = policy_samples(policy, tokenizer, prompts)
    base = MTPHead.from_pretrained(args.base_head, policy=policy).eval()
    data = prepared_set(
        policy, tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)], [len(p) for p in prompts],
        base.aux_layers, args.batch_size,
    )  # fmt: skip

    results = {"settings": vars(args), "base": None, "heads": {}}
    if os.path.exists(args.output):  # scored earlier on the same samples: only new heads are scored
        with open(args.output, encoding="utf-8") as f:
            stored = json.load(f)
        if {k: v for k, v in stored["settings"].items() if k != "output"} == {
            k: v for k, v in vars(args).items() if k != "output"
        }:
            results.update(base=stored["base"], heads=stored["heads"])
    results["base"] = results["base"] or score(base, data)
    for folder in sorted(glob.glob(os.path.join(args.work_dir, "*", "*-seed*"))):
        stage, name = folder.split(os.sep)[-2:]
        loss, seed = name.rsplit("-seed", 1)
        key = f"{stage}/{loss}/{seed}"
        if key in results["heads"] or not os.path.isfile(os.path.join(folder, "model.safetensors")):
            continue
        head = MTPHead.from_pretrained(folder, policy=policy).eval()
        results["heads"][key] = score(head, data)
        print(f"{key}: {json.dumps(results['heads'][key])}", flush=True)

    grouped = defaultdict(list)
    for key, figures in results["heads"].items():
        grouped[key.rsplit("/", 1)[0]].append(figures)
    lines = [
        "| head | seeds | 1 - TV, step 1 / 2 / 3 | expected accepted drafts per cycle (k = 3) |",
        "|---|---|---|---|",
        f"| base | - | {' / '.join(f'{a:.3f}' for a in results['base']['acceptance_per_step'])} | "
        f"{results['base']['expected_accepted_drafts_per_cycle']:.3f} |",
    ]
    results["summary"] = {}
    for group, runs in grouped.items():
        steps = [statistics.mean(col) for col in zip(*(r["acceptance_per_step"] for r in runs), strict=True)]
        first = [r["acceptance_per_step"][0] for r in runs]
        drafts = [r["expected_accepted_drafts_per_cycle"] for r in runs]
        spread = {
            name: statistics.stdev(values) if len(values) > 1 else 0.0
            for name, values in (("step_1", first), ("drafts", drafts))
        }
        results["summary"][group] = {
            "seeds": len(runs), "acceptance_per_step": steps, "step_1_std": spread["step_1"],
            "expected_accepted_drafts_per_cycle": statistics.mean(drafts), "drafts_std": spread["drafts"],
        }  # fmt: skip
        lines.append(
            f"| {group} | {len(runs)} | {steps[0]:.3f} ± {spread['step_1']:.3f} / {steps[1]:.3f} / {steps[2]:.3f} | "
            f"{statistics.mean(drafts):.3f} ± {spread['drafts']:.3f} |"
        )
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
