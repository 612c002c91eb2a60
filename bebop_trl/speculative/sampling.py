"""Turning logits into the sampling distribution, and drawing from it.

Every distribution the library samples from or scores against (the policy's p, the draft head's q, the log-probs
returned to trainers) goes through [`probs_from_logits`][bebop_trl.speculative.probs_from_logits], so that the
policy and draft sides can never disagree on what temperature, top-k and top-p mean.
"""

import torch


def validate_sampling_params(temperature: float, top_k: int, top_p: float) -> None:
    """Raises `ValueError` if the sampling parameters are out of range.

    Args:
        temperature: Must be >= 0 (0 means greedy).
        top_k: Must be >= 0 (0 disables top-k).
        top_p: Must be in (0, 1] (1 disables top-p).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy decoding), got {temperature}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables top-k), got {top_k}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables top-p), got {top_p}.")


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Applies temperature, then top-k, then top-p to logits, in the order of `transformers`' logits warpers.

    Args:
        logits: [..., V] raw logits.
        temperature: Divides the logits; must be > 0 here (greedy decoding is handled by `probs_from_logits`).
        top_k: Keep the `top_k` largest logits (ties at the boundary are kept); 0 keeps all.
        top_p: Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.

    Returns:
        [..., V] float32 logits, with `-inf` for the tokens removed.
    """
    logits = logits.float() / temperature
    vocab_size = logits.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the more likely tokens already reach top_p; the most likely one always stays.
        sorted_drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.empty_like(sorted_drop).scatter_(-1, order, sorted_drop)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The processed sampling distribution: softmax of [`process_logits`][bebop_trl.speculative.process_logits].

    Temperature 0 is greedy decoding: the distribution is one-hot on the argmax (top-k and top-p cannot change it).

    Args:
        logits: [..., V] raw logits.
        temperature: Sampling temperature (>= 0).
        top_k: Top-k cut-off; 0 disables it.
        top_p: Nucleus mass; 1 disables it.

    Returns:
        [..., V] float32 probabilities.
    """
    if temperature == 0:
        argmax = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, argmax, 1.0)
    return process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws one token per distribution, by inverting its cumulative distribution.

    One uniform per row and a binary search over the float64 cumulative sum: on CPU this is one to two orders of
    magnitude cheaper than `torch.multinomial` over a 50k-token vocabulary, which draws an exponential per token.
    The float64 sum keeps each token's interval within float64 rounding of its probability, and a token of
    probability 0 has an empty interval, so it is never drawn.

    Args:
        probs: [..., V] probabilities (rows need not be normalised, but must have positive mass).
        generator: Random generator on the device of `probs`, for reproducible draws.

    Returns:
        [...] long token ids.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cumulative = flat.cumsum(dim=-1, dtype=torch.float64)
    uniform = torch.rand(flat.shape[0], 1, dtype=torch.float64, generator=generator, device=flat.device)
    # right=True: the first token whose cumulative mass exceeds u, which skips tokens of probability 0.
    tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    # u * total rounds up to total with probability ~2^-53: stay inside the vocabulary then.
    return tokens.clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])
