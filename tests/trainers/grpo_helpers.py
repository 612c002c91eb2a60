"""Shared by the BebopGRPOTrainer tests: GRPO settings for tiny, fast runs on CPU, and the pieces of the rollout
exactness tests (token-id rewards and the exact laws they are tested against)."""

from collections import defaultdict

import torch

from bebop_trl import BebopGRPOConfig
from bebop_trl.speculative import probs_from_logits
from bebop_trl.testing import TINY_VOCAB_SIZE


def grpo_config(output_dir, config_class=BebopGRPOConfig, **overrides):
    """A GRPO config for a run of 2 steps of 4 completions of at most 10 tokens; `overrides` change any field."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        logging_steps=1,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)


# ------------------------------------------------------------------------------------ exactness of the rollouts

EXACT_PROMPTS = ["hello", "3*4="]  # different lengths: the batch is left-padded
ROWS_PER_PROMPT = 2048
NO_TOKEN = TINY_VOCAB_SIZE  # reward of a token position the completion did not reach (it ended at EOS)


class TokenReward:
    """A reward that is the id of the completion's token at `position` (NO_TOKEN past its end); keeps a log."""

    def __init__(self, position: int):
        self.position, self.__name__ = position, f"token_{position}"
        self.given: dict[str, list[int]] = defaultdict(list)

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        rewards = [ids[self.position] if len(ids) > self.position else NO_TOKEN for ids in completion_ids]
        for prompt, reward in zip(prompts, rewards, strict=True):
            self.given[prompt].append(reward)
        return [float(r) for r in rewards]


@torch.no_grad()
def first_two_token_laws(policy, prompt_ids, eos_token_ids, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact laws of the first and the second completion token (cell NO_TOKEN: the completion ended before)."""
    prompt = torch.tensor([prompt_ids])
    first = probs_from_logits(policy(input_ids=prompt).logits[:, -1], **sampling)[0].double()
    prefixes = torch.cat([prompt.expand(TINY_VOCAB_SIZE, -1), torch.arange(TINY_VOCAB_SIZE).unsqueeze(-1)], dim=1)
    second_given_first = probs_from_logits(policy(input_ids=prefixes).logits[:, -1], **sampling).double()
    ends = torch.zeros(TINY_VOCAB_SIZE, dtype=torch.bool)
    ends[list(eos_token_ids)] = True
    first_law = torch.cat([first, torch.zeros(1, dtype=torch.float64)])
    second_law = torch.cat([(first * ~ends) @ second_given_first, first[ends].sum().reshape(1)])
    return first_law, second_law
