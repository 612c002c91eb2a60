"""Weight transfer to a vLLM server through files: TRL's async weight-transfer protocol without NCCL.

TRL's `AsyncGRPOTrainer` publishes the policy to its vLLM server through a `WeightTransferProtocol`; its own
implementation broadcasts over NCCL, which needs GPUs on both sides. [`FileWeightTransfer`] writes the weights as
safetensors into a folder the server can read (a local or shared file system) and has the server load them in place
with the `bebop_file` engine of [`bebop_trl.vllm_plugin.weight_transfer`]. It also carries the MTP head: after an
online update of the head, the next sync loads it into the server's drafter in the same pause.
"""

import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
import torch
from safetensors.torch import save_file

from ..vllm_plugin import FILE_WEIGHT_TRANSFER


POLICY_PREFIX = "policy-"
DRAFT_PREFIX = "draft-"


class FileWeightTransfer:
    """TRL's `WeightTransferProtocol` through safetensors files and vLLM's weight-update routes.

    The server must run in vLLM's dev mode with `--weight-transfer-config '{"backend": "bebop_file"}'`, which
    `bebop-trl vllm-serve --weight_transfer file` sets. Each sync writes one folder, `sync_dir/policy-<n>`, and
    removes the previous one once the server has loaded the new one.

    Args:
        base_url: The server's URL, e.g. `http://localhost:8000`.
        sync_dir: A folder the trainer writes and the server reads (the same path on both sides).
        timeout: Seconds to wait for the server to come up, and for each request.
        draft_weights: Returns the head's weights under the names of the exported draft checkpoint
            ([`vllm_draft_weights`][bebop_trl.modeling.vllm_export.vllm_draft_weights]); needed for
            [`head_updated`][bebop_trl.rollout.file_weight_transfer.FileWeightTransfer.head_updated].
    """

    def __init__(
        self,
        base_url: str,
        sync_dir: str,
        *,
        timeout: float = 240.0,
        draft_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.sync_dir = os.path.abspath(sync_dir)
        self.timeout = timeout
        self._draft_weights = draft_weights
        self._session = requests.Session()
        self._version = 0
        self._head_stale = False

    # ------------------------------------------------------------------------------------------ TRL's protocol

    def init_weight_transfer(self) -> None:
        """Waits for the server, checks that it loads weights from files, and starts its transfer engine."""
        # (TRL's VLLMClient waits the same way, but logs through accelerate, which needs a trainer's state.)
        backend = (self.wait_for_server().get("weight_transfer_config") or {}).get("backend")
        if backend != FILE_WEIGHT_TRANSFER:
            raise ValueError(
                f"The vLLM server at {self.base_url} transfers weights with {backend!r}, not from files. Start it "
                f"with `bebop-trl vllm-serve ... --weight_transfer file` (or pass --weight-transfer-config "
                f'\'{{"backend": "{FILE_WEIGHT_TRANSFER}"}}\' to `vllm serve` with this package installed).'
            )
        os.makedirs(self.sync_dir, exist_ok=True)
        self._post("/init_weight_transfer_engine", json={"init_info": {}})

    def pause(self) -> None:
        # `keep`: requests in flight wait and finish on the new weights, as with TRL's NCCL transfer.
        self._post("/pause", params={"mode": "keep"})

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Writes the policy's weights to a new folder and has the server load them; then the head, if it changed."""
        self._version += 1
        folder = self._write(f"{POLICY_PREFIX}{self._version}", dict(iterator))
        self._post("/start_weight_update", json={"is_checkpoint_format": True})
        self._post("/update_weights", json={"update_info": {"path": folder}})
        self._post("/finish_weight_update", json={"weight_version": str(self._version)})
        if self._head_stale:
            self.push_head()
        # Cached prefixes were computed with the old weights.
        self._post("/reset_prefix_cache")
        self._remove_older(POLICY_PREFIX, self._version)

    def resume(self) -> None:
        self._post("/resume")

    def destroy(self) -> None:
        shutil.rmtree(self.sync_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ the head

    def head_updated(self) -> None:
        """Marks the head as changed: the next sync loads it into the server's drafter."""
        if self._draft_weights is None:
            raise ValueError("This FileWeightTransfer has no `draft_weights`, so it cannot load a head.")
        self._head_stale = True

    def push_head(self) -> None:
        """Loads the head into the server's drafter now (call within a pause)."""
        weights = self._draft_weights()
        folder = self._write(f"{DRAFT_PREFIX}{self._version}", weights)
        self._post("/start_draft_weight_update")
        self._post("/update_weights", json={"update_info": {"path": folder}})
        self._post("/finish_weight_update")
        self._head_stale = False
        self._remove_older(DRAFT_PREFIX, self._version)

    # ------------------------------------------------------------------------------------------ helpers

    def wait_for_server(self) -> dict[str, Any]:
        """Waits until the server answers `/health`, then returns its `/server_info` (vLLM's config as JSON)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._session.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"The vLLM server at {self.base_url} did not answer within {self.timeout:.0f} s.")
            time.sleep(2.0)
        response = self._session.get(
            f"{self.base_url}/server_info", params={"config_format": "json"}, timeout=self.timeout
        )
        if response.status_code == 404:
            raise RuntimeError(
                f"The vLLM server at {self.base_url} has no /server_info: start it with VLLM_SERVER_DEV_MODE=1 (as "
                "`bebop-trl vllm-serve` does), which also enables the weight-update routes."
            )
        response.raise_for_status()
        info = response.json()
        return info.get("vllm_config", info)

    def _write(self, name: str, weights: dict[str, torch.Tensor]) -> str:
        """Saves `weights` to `sync_dir/name/model.safetensors`, complete before the folder appears."""
        folder = os.path.join(self.sync_dir, name)
        partial = f"{folder}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in weights.items()}
        save_file(tensors, os.path.join(partial, "model.safetensors"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return folder

    def _remove_older(self, prefix: str, version: int) -> None:
        for entry in os.listdir(self.sync_dir):
            if entry.startswith(prefix) and entry[len(prefix) :].isdigit() and int(entry[len(prefix) :]) < version:
                shutil.rmtree(os.path.join(self.sync_dir, entry), ignore_errors=True)

    def _post(self, route: str, **kwargs: Any) -> None:
        response = self._session.post(f"{self.base_url}{route}", timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(
                f"The vLLM server at {self.base_url} answered {route} with {response.status_code}: "
                f"{response.text[:500]}"
            )
