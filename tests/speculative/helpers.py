"""Reference computations for the speculative-decoding tests: exact laws, chi-square tests, uncached head drafts."""

import numpy as np
import torch
from scipy import stats

from bebop_trl.modeling import MTPHead
from bebop_trl.speculative import probs_from_logits


def chisquare_pvalue(samples: torch.Tensor, law: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of a chi-square goodness-of-fit test of integer `samples` against the probability vector `law`.

    Cells with an expected count below `min_expected` are merged into one cell. A sample in a cell of probability 0
    fails the test outright (p-value 0).
    """
    law = law.double().cpu()
    counts = torch.bincount(samples.cpu(), minlength=len(law)).double()
    if counts[law == 0].sum() > 0:
        return 0.0
    expected = law / law.sum() * counts.sum()
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


@torch.no_grad()
def exact_sequence_law(
    model,
    prompt: list[int],
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """The exact law of the first `num_tokens` sampled tokens, by enumeration of every prefix.

    Returns a vector over (V + 1) ** num_tokens cells indexed by `encode_sequences`; symbol V stands for "no token"
    (after EOS).
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    ended_symbol = vocab_size
    law = torch.ones(1, dtype=torch.float64)
    prefixes = torch.empty(1, 0, dtype=torch.long)
    for _ in range(num_tokens):
        inputs = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes.clamp(max=vocab_size - 1)], 1)
        probs = probs_from_logits(model(input_ids=inputs).logits[:, -1], temperature, top_k, top_p).double()
        next_law = torch.cat([probs, torch.zeros(len(prefixes), 1, dtype=torch.float64)], dim=1)
        if eos_token_id is not None and prefixes.shape[1] > 0:
            ended = (prefixes[:, -1] == eos_token_id) | (prefixes[:, -1] == ended_symbol)
            next_law[ended] = 0.0
            next_law[ended, ended_symbol] = 1.0
        law = (law.unsqueeze(-1) * next_law).reshape(-1)
        symbols = torch.arange(vocab_size + 1).repeat(len(prefixes)).unsqueeze(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(vocab_size + 1, dim=0), symbols], dim=1)
    return law


def encode_sequences(completion_ids: torch.Tensor, completion_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cell index of each row's completion in the law of `exact_sequence_law` (V marks "no token")."""
    symbols = torch.where(completion_mask.bool(), completion_ids, vocab_size)
    weights = (vocab_size + 1) ** torch.arange(symbols.shape[1] - 1, -1, -1)
    return (symbols * weights).sum(dim=-1)


@torch.no_grad()
def uncached_draft_probs(
    model, head: MTPHead, sequence: list[int], drafts: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """The head's draft distributions after `sequence`, recomputed without any KV cache.

    Step 1 reads the policy's hidden states of the whole sequence (teacher forcing); step j appends the head's own
    output of step j - 1 and draft j - 1 as one more slot. `drafts` are the tokens drafted at steps 1..k-1.

    Returns:
        [k, V] processed draft distributions, k = len(drafts) + 1.
    """
    ids = torch.tensor([sequence])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1]
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


def perturbed_head(model, scale: float, seed: int = 0) -> MTPHead:
    """A head initialised from `model`, with Gaussian noise added to every weight so that it drafts imperfectly."""
    head = MTPHead.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return head


def binomial_z(successes: int, trials: int, probability: float) -> float:
    """z-score of an observed success count against a binomial expectation."""
    return (successes - trials * probability) / np.sqrt(trials * probability * (1 - probability))
