"""Measuring whether an engine samples the policy's law: exact laws of short completions and a chi-square test.

The first few tokens of a tiny policy have a law that can be enumerated exactly; a sampler that is distributed as
the policy passes a goodness-of-fit test against it, and one with a bias of a few points fails it. These pieces
back [`verify_engine`][bebop_trl.verification.verify_engine] and the library's own distribution tests.
"""

import torch

from .sampling import probs_from_logits, process_logits


@torch.no_grad()
def exact_sequence_law(
    model: torch.nn.Module,
    prompt: list[int],
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """The exact law of the first `num_tokens` sampled tokens, by enumeration of every prefix.

    Costs (V + 1) ** (num_tokens - 1) sequences through the model: meant for vocabularies of a few dozen tokens.

    Args:
        model: A causal LM.
        prompt: Prompt token ids.
        num_tokens: Length of the completions whose law is enumerated.
        temperature: Sampling temperature (> 0).
        top_k: Top-k cut-off; 0 disables it.
        top_p: Nucleus mass; 1 disables it.
        eos_token_id: A token after which the completion ends (None: completions never end).

    Returns:
        [(V + 1) ** num_tokens] float64 probabilities, indexed by
        [`encode_sequences`][bebop_trl.speculative.exactness.encode_sequences]; symbol V stands for "no token"
        (after the end).
    """
    device = model.get_output_embeddings().weight.device
    vocab_size = model.get_output_embeddings().weight.shape[0]
    ended_symbol = vocab_size
    law = torch.ones(1, dtype=torch.float64, device=device)
    prefixes = torch.empty(1, 0, dtype=torch.long, device=device)
    prompt_ids = torch.tensor(prompt, device=device)
    for _ in range(num_tokens):
        inputs = torch.cat([prompt_ids.expand(len(prefixes), -1), prefixes.clamp(max=vocab_size - 1)], 1)
        logits = model(input_ids=inputs).logits[:, -1]
        probs = probs_from_logits(logits, temperature, top_k, top_p).double()
        next_law = torch.cat([probs, probs.new_zeros(len(prefixes), 1)], dim=1)
        if eos_token_id is not None and prefixes.shape[1] > 0:
            ended = (prefixes[:, -1] == eos_token_id) | (prefixes[:, -1] == ended_symbol)
            next_law[ended] = 0.0
            next_law[ended, ended_symbol] = 1.0
        law = (law.unsqueeze(-1) * next_law).reshape(-1)
        symbols = torch.arange(vocab_size + 1, device=device).repeat(len(prefixes)).unsqueeze(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(vocab_size + 1, dim=0), symbols], dim=1)
    return law.cpu()


def encode_sequences(completion_ids: torch.Tensor, completion_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cell index of each row's completion in the law of
    [`exact_sequence_law`][bebop_trl.speculative.exactness.exact_sequence_law].

    Args:
        completion_ids: [B, n] token ids.
        completion_mask: [B, n] 1 where the row has a token (0 after its end).
        vocab_size: V; symbol V marks "no token".

    Returns:
        [B] long cell indices.
    """
    symbols = torch.where(completion_mask.bool(), completion_ids, vocab_size)
    weights = (vocab_size + 1) ** torch.arange(symbols.shape[1] - 1, -1, -1, device=symbols.device)
    return (symbols * weights).sum(dim=-1)


def chisquare_pvalue(samples: torch.Tensor, law: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of a chi-square goodness-of-fit test of integer `samples` against the probability vector `law`.

    Cells with an expected count below `min_expected` are merged into one cell, so that the chi-square
    approximation holds. A sample in a cell of probability 0 fails the test outright (p-value 0).

    Args:
        samples: [N] cell indices in [0, len(law)).
        law: [C] probabilities (normalised here).
        min_expected: Smallest expected count of a cell kept on its own.

    Returns:
        The p-value: the probability, under `law`, of a statistic at least as large as the observed one.
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
    degrees_of_freedom = len(expected) - 1
    if degrees_of_freedom < 1:
        return 1.0
    statistic = ((observed - expected) ** 2 / expected).sum()
    # The chi-square survival function: the regularised upper incomplete gamma function Q(df / 2, x / 2).
    return float(torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2, dtype=torch.float64), statistic / 2))


@torch.no_grad()
def completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> list[list[float]]:
    """Log-probabilities of completion tokens under the processed policy distribution, from a fresh forward pass.

    This is what an engine's sampling log-probs must equal: the tokens were drawn from that distribution.

    Args:
        model: The causal LM.
        prompts: Prompt token ids per row.
        completions: Completion token ids per row.
        temperature: Sampling temperature (> 0: greedy decoding has no sampling log-probs).
        top_k: Top-k cut-off; 0 disables it.
        top_p: Nucleus mass; 1 disables it.
        batch_size: Rows per forward pass.

    Returns:
        Per row, one log-probability per completion token (float32 precision).
    """
    device = model.get_input_embeddings().weight.device
    results: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        rows = list(zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True))
        width = max(len(p) + len(c) for p, c in rows)
        # Right padding: positions then count from each row's first token without position ids.
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            sequence = prompt + completion
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for i, (prompt, completion) in enumerate(rows):
            if not completion:
                results.append([])
                continue
            # The logits at position t score the token at t + 1.
            scores = logits[i, len(prompt) - 1 : len(prompt) + len(completion) - 1]
            log_probs = process_logits(scores, temperature, top_k, top_p).log_softmax(dim=-1)
            tokens = torch.tensor(completion, device=log_probs.device).unsqueeze(-1)
            results.append(log_probs.gather(-1, tokens).squeeze(-1).tolist())
    return results
