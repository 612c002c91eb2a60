"""BebopGRPOTrainer's rollouts on fixed seeds, token for token and log-prob for log-prob, against a stored record.

The record (`data/grpo_rollouts.json`) was written by this test with `BEBOP_RECORD_ROLLOUTS=1` before the rollout
backends moved out of the trainer; any change to how rounds are seeded, snapshotted or generated shows here.
"""

import json
import os
import pathlib

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from bebop_trl import BebopGRPOTrainer, MTPHead

from .grpo_helpers import grpo_config


RECORD = pathlib.Path(__file__).parent / "data" / "grpo_rollouts.json"
PROMPTS = [f"q{i}:" for i in range(8)]
# name -> (whether a head drafts, config overrides)
CASES = {
    "engine": (True, {}),
    "async": (True, {"async_rollouts": True}),
    "async_without_head": (False, {"async_rollouts": True}),
    "online_head_updates": (True, {"mtp_online_loss": "kl", "mtp_head": "given"}),
    "greedy_drafting": (True, {"draft_sampling": "greedy", "num_speculative_tokens": 2}),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def length_reward(prompts, completions, **kwargs):
    return [float(len(completion) % 5) for completion in completions]


def training_rollouts(tiny_checkpoints, output_dir, with_head: bool, overrides: dict) -> list[dict]:
    """Every training round's completions and sampling log-probs over a 3-step run."""
    path = tiny_checkpoints["llama"]
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = None
    if with_head:
        torch.manual_seed(0)
        head = MTPHead.from_model(policy)
    args = grpo_config(output_dir, max_steps=3, learning_rate=1e-2, seed=3, **overrides)
    trainer = BebopGRPOTrainer(
        policy,
        length_reward,
        args=args,
        head=head,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    rounds = []
    generate = trainer._generate_single_turn

    def recording(prompt_ids, *rest, **kwargs):
        completion_ids, logprobs = generate(prompt_ids, *rest, **kwargs)
        rounds.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs})
        return completion_ids, logprobs

    trainer._generate_single_turn = recording
    trainer.train()
    return rounds


@pytest.mark.parametrize("case", CASES)
def test_rollouts_match_the_record(case, tiny_checkpoints, tmp_path):
    with_head, overrides = CASES[case]
    rounds = training_rollouts(tiny_checkpoints, tmp_path, with_head, overrides)
    assert rounds and all(r["completion_ids"] for r in rounds)
    if os.environ.get("BEBOP_RECORD_ROLLOUTS") == "1":
        record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        record[case] = rounds
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(record))
        pytest.skip("recorded")
    expected = json.loads(RECORD.read_text())[case]
    assert len(rounds) == len(expected)
    for index, (got, want) in enumerate(zip(rounds, expected, strict=True)):
        assert got["prompt_ids"] == want["prompt_ids"], f"round {index}: prompts differ"
        assert got["completion_ids"] == want["completion_ids"], f"round {index}: completions differ"
        # Tokens must match exactly; log-probs to rounding, since CPUs with other vector units (the record was made
        # on one machine) sum the same products in another order. After optimizer steps the tolerance is wider: Adam's
        # first steps, normalised by tiny second moments, carry those last-bit differences into the weights.
        tolerance = 1e-5 if index == 0 else 1e-3
        torch.testing.assert_close(
            torch.tensor([x for row in got["logprobs"] for x in row]),
            torch.tensor([x for row in want["logprobs"] for x in row]),
            rtol=tolerance, atol=tolerance,
            msg=lambda m, index=index: f"round {index}: sampling log-probs differ: {m}",
        )  # fmt: skip
