"""Reference computations for the speculative-decoding tests: uncached head drafts and binomial z-scores, plus the
library's exact laws and chi-square test."""

import numpy as np
import torch

from bebop_trl.modeling import MTPHead
from bebop_trl.speculative import probs_from_logits
from bebop_trl.speculative.exactness import chisquare_pvalue, encode_sequences, exact_sequence_law
from bebop_trl.testing import perturbed_head


__all__ = [
    "binomial_z",
    "chisquare_pvalue",
    "encode_sequences",
    "exact_sequence_law",
    "perturbed_head",
    "uncached_draft_probs",
]


@torch.no_grad()
def uncached_draft_probs(
    model, head: MTPHead, sequence: list[int], drafts: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """The head's draft distributions after `sequence`, recomputed without any KV cache.

    Step 1 reads the policy's hidden states of the whole sequence (teacher forcing; its final ones, or the layers an
    eagle3 head fuses); step j appends the head's own
    output of step j - 1 and draft j - 1 as one more slot. `drafts` are the tokens drafted at steps 1..k-1.

    Returns:
        [k, V] processed draft distributions, k = len(drafts) + 1.
    """
    ids = torch.tensor([sequence])
    hidden = head.policy_features(model(input_ids=ids, output_hidden_states=True).hidden_states)[:, :-1]
    tokens = ids[:, 1:]
    probs = []
    for step in range(len(drafts) + 1):
        positions = torch.arange(1, tokens.shape[1] + 1).unsqueeze(0)
        out = head(hidden, tokens, position_ids=positions).last_hidden_state[:, -1]
        probs.append(probs_from_logits(head.compute_logits(out), temperature)[0])
        if step < len(drafts):
            hidden = torch.cat([hidden, out.unsqueeze(1)], dim=1)
            tokens = torch.cat([tokens, torch.tensor([[drafts[step]]])], dim=1)
    return torch.stack(probs)


def binomial_z(successes: int, trials: int, probability: float) -> float:
    """z-score of an observed success count against a binomial expectation."""
    return (successes - trials * probability) / np.sqrt(trials * probability * (1 - probability))
