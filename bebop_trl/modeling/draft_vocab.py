"""Choosing a head's draft vocabulary: the tokens that carry most of the policy's probability mass on its own data.

A head that drafts from a subset D of the vocabulary is accepted with probability at most `p(D)`, the mass the
policy puts on D at that position, so D should cover as much of the policy's mass as its size allows. On
self-distilled data (the policy's own samples at the rollout temperature), the frequency of each token is an
unbiased estimate of the policy's mean probability for it; the policy's probabilities themselves, where available,
give a lower-variance estimate.
"""

from collections.abc import Iterable

import torch


def estimate_token_mass(
    vocab_size: int,
    *,
    sequences: Iterable[Iterable[int] | torch.Tensor] | None = None,
    probs: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The policy's mean probability of each token, estimated from data.

    Args:
        vocab_size: Size of the policy's vocabulary.
        sequences: Token id sequences sampled from the policy (e.g. self-distilled completions, without padding);
            each token counts once.
        probs: Instead of `sequences`, the policy's next-token probabilities at the positions of such data, as
            [..., V] tensors (one tensor, or several, e.g. one per batch).

    Returns:
        [V] float64 tensor summing to 1.

    Raises:
        ValueError: If neither or both sources are given, a token id or a probability row does not fit
            `vocab_size`, or the data hold no token.
    """
    if (sequences is None) == (probs is None):
        raise ValueError("Estimate the token mass from exactly one of sequences (token ids) and probs.")
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    if probs is not None:
        for batch in [probs] if isinstance(probs, torch.Tensor) else probs:
            if batch.shape[-1] != vocab_size:
                raise ValueError(
                    f"probs must have the vocabulary ({vocab_size}) last, got shape {tuple(batch.shape)}."
                )
            mass += batch.detach().reshape(-1, vocab_size).sum(dim=0).double().cpu()
    else:
        for sequence in sequences:
            ids = torch.as_tensor(sequence, dtype=torch.long).reshape(-1).cpu()
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"Token ids must lie in [0, {vocab_size}); pass unpadded sequences of this policy.")
            mass += torch.bincount(ids, minlength=vocab_size).double()
    total = mass.sum()
    if total <= 0:
        raise ValueError("The data hold no token to estimate the policy's token mass from.")
    return mass / total


def select_draft_vocab(
    vocab_size: int,
    *,
    sequences: Iterable[Iterable[int] | torch.Tensor] | None = None,
    probs: torch.Tensor | Iterable[torch.Tensor] | None = None,
    size: int | None = None,
    mass: float | None = None,
    always_include: Iterable[int] = (),
) -> torch.LongTensor:
    """The draft vocabulary that covers the most estimated policy mass: by size, or the smallest reaching a mass.

    Tokens are ranked by their estimated mass (see [`estimate_token_mass`][bebop_trl.modeling.draft_vocab.estimate_token_mass];
    ties by id), after the ids of `always_include`, which are always in the result whatever their mass: pass the
    EOS, pad and other special tokens, so that the head can end a completion.

    Args:
        vocab_size: Size of the policy's vocabulary.
        sequences: Token id sequences sampled from the policy (see `estimate_token_mass`).
        probs: Instead of `sequences`, the policy's next-token probabilities on such data.
        size: Number of tokens in the draft vocabulary.
        mass: Instead of `size`, the fraction of the estimated mass to cover, in (0, 1]: the result is the smallest
            vocabulary that reaches it (tokens never seen in the data are never needed for it).
        always_include: Token ids to include in any case.

    Returns:
        The sorted target token ids of the draft vocabulary, for `MTPHead.from_model(policy, draft_vocab=...)`.

    Raises:
        ValueError: If not exactly one of `size` and `mass` is given, or it is out of range.
    """
    if (size is None) == (mass is None):
        raise ValueError("Give the draft vocabulary's size or the mass it should cover (exactly one of the two).")
    token_mass = estimate_token_mass(vocab_size, sequences=sequences, probs=probs)
    included = torch.as_tensor(sorted(set(always_include)), dtype=torch.long)
    if len(included) and (included[0] < 0 or included[-1] >= vocab_size):
        raise ValueError(f"always_include holds ids outside the vocabulary [0, {vocab_size}).")
    # Stable sort of the negated mass: the heaviest first, ties by id.
    ranked = torch.sort(-token_mass, stable=True).indices
    rest = ranked[~torch.isin(ranked, included)]
    order = torch.cat([included, rest])
    if size is not None:
        if not len(included) <= size <= vocab_size or size < 1:
            raise ValueError(
                f"size must lie in [max(1, {len(included)} always-included ids), {vocab_size}], got {size}."
            )
        count = size
    else:
        if not 0 < mass <= 1:
            raise ValueError(f"mass must lie in (0, 1], got {mass}.")
        covered = torch.cumsum(token_mass[order], dim=0)
        # The tolerance keeps mass=1 reachable despite the rounding of the cumulative sum.
        count = max(len(included), int(torch.searchsorted(covered, mass - 1e-12)) + 1)
    return order[:count].sort().values


def draft_vocab_mass(
    draft_vocab: torch.Tensor | Iterable[int],
    vocab_size: int,
    *,
    sequences: Iterable[Iterable[int] | torch.Tensor] | None = None,
    probs: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> float:
    """The fraction of the policy's estimated mass that a draft vocabulary covers on given data.

    On held-out self-distilled data this is the ceiling of the head's mean acceptance per draft step: rejection
    sampling never accepts mass outside the draft vocabulary.

    Args:
        draft_vocab: Target token ids of the draft vocabulary.
        vocab_size: Size of the policy's vocabulary.
        sequences: Token id sequences sampled from the policy (see `estimate_token_mass`).
        probs: Instead of `sequences`, the policy's next-token probabilities on such data.

    Returns:
        The covered fraction, in [0, 1].
    """
    token_mass = estimate_token_mass(vocab_size, sequences=sequences, probs=probs)
    ids = torch.as_tensor(list(draft_vocab) if not isinstance(draft_vocab, torch.Tensor) else draft_vocab)
    return float(token_mass[ids.long().unique().cpu()].sum())
