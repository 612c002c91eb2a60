"""Loss ablation on SmolLM2-135M-Instruct: heads trained briefly with each loss on the same self-distilled data.

Every head starts from the same initialisation and sees the same data, steps and learning rate; only the loss
differs. With `--kl-warm-start-steps W` one more head spends the first W of its steps on `kl` and the rest on
`e2e_tv`: the comparison between a KL warm start and the default identity initialisation for TV training. Reported per loss: the analytic per-step acceptance 1 - TV and expected accepted length on held-out
self-distilled data (teacher forcing), and the acceptance measured with the real engine (k drafted tokens,
temperature T) in both drafting modes on held-out prompts.

    python benchmarks/study_mtp_losses.py                      # about 30 minutes on 2 CPU cores
    python benchmarks/study_mtp_losses.py --max-steps 20 --num-prompts 32 --eval-prompts 4   # a smoke run
"""

import argparse
import json
import os
import tempfile
import time

from bebop_trl import MTPConfig, MTPTrainer
from bebop_trl.embedded import load_smollm2
from bebop_trl.tasks import reasoning_gym_dataset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["ce", "kl", "tv", "e2e_tv"])
    parser.add_argument("--task", default="basic_arithmetic", help="reasoning-gym task of the prompts")
    parser.add_argument("--num-prompts", type=int, default=256, help="training prompts (self-distilled once)")
    parser.add_argument("--distill-max-new-tokens", type=int, default=96)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-mtp-steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=3, help="drafted tokens per cycle when measuring acceptance")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-max-new-tokens", type=int, default=96)
    parser.add_argument("--kl-warm-start-steps", type=int, default=0, help="add a kl -> e2e_tv head (0: none)")
    parser.add_argument("--save-heads", default=None, help="folder to save each trained head in (one per loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/mtp_losses.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    policy, tokenizer = load_smollm2()
    train_prompts = reasoning_gym_dataset(args.task, args.num_prompts, seed=args.seed)
    eval_prompts = reasoning_gym_dataset(args.task, args.eval_prompts, seed=args.seed + 1)
    results = {}
    runs = [(loss_type, [(loss_type, args.max_steps)]) for loss_type in args.losses]
    if args.kl_warm_start_steps:
        warm = args.kl_warm_start_steps
        runs.append(("kl->e2e_tv", [("kl", warm), ("e2e_tv", args.max_steps - warm)]))
    for name, phases in runs:
        head, train_seconds = None, 0.0
        for phase, (loss_type, max_steps) in enumerate(phases):
            trainer = MTPTrainer(
                policy,
                # Same self-distilled data (keyed by `seed`); a later phase draws its batches in a new order.
                study_config(args, loss_type, max_steps, data_seed=args.seed + phase),
                train_prompts,
                eval_prompts,
                processing_class=tokenizer,
                head=head,
            )
            started = time.perf_counter()
            trainer.train()
            train_seconds += time.perf_counter() - started
            head = trainer.head
        metrics = trainer.evaluate()
        if args.save_heads:
            trainer.save_model(os.path.join(args.save_heads, name.replace(">", "")))
        results[name] = {"train_seconds": round(train_seconds, 1), **metrics}
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}", flush=True)

    print_table(results, args.k)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.output}")


def study_config(args: argparse.Namespace, loss_type: str, max_steps: int, data_seed: int) -> MTPConfig:
    return MTPConfig(
        output_dir=tempfile.mkdtemp(prefix=f"study-{loss_type}-"),
        loss_type=loss_type,
        kl_warm_start=0,  # the warm start is the explicit two-phase run, so the other heads train from the start
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_mtp_steps=args.num_mtp_steps,
        num_speculative_tokens=args.k,
        temperature=args.temperature,
        distill_max_new_tokens=args.distill_max_new_tokens,
        eval_num_prompts=args.eval_prompts,
        eval_max_new_tokens=args.eval_max_new_tokens,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=max(1, max_steps // 10),
        seed=args.seed,
        data_seed=data_seed,
    )


def print_table(results: dict, k: int) -> None:
    positions = " | ".join(f"prob. pos {j}" for j in range(1, k + 1))
    print(f"\n| loss | analytic 1-TV step 1 | expected length | prob. acceptance | {positions} | greedy acceptance |")
    print("|---" * (5 + k) + "|")
    for loss_type, m in results.items():
        per_position = " | ".join(
            f"{m[f'eval_measured_acceptance_probabilistic/position_{j}']:.3f}" for j in range(1, k + 1)
        )
        print(
            f"| {loss_type} | {m['eval_acceptance/step_1']:.3f} | {m['eval_expected_accepted_length']:.3f} | "
            f"{m['eval_measured_acceptance_probabilistic']:.3f} | {per_position} | "
            f"{m['eval_measured_acceptance_greedy']:.3f} |"
        )


if __name__ == "__main__":
    main()
