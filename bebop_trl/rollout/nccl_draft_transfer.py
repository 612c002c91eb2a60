"""TRL's NCCL weight transfer for async GRPO, extended to carry the MTP head to the server's drafter.

TRL's `WeightTransferClient` broadcasts the policy into the vLLM server over an NCCL group that it sets up once.
vLLM receives a draft model's weights through the same engine after `/start_draft_weight_update`, so an online head
update needs no second group: [`NCCLDraftWeightTransfer`] sends the policy with TRL's client and, when the head has
changed, sends the head with a second TRL client bound to the same group whose update session starts at the draft
route. The broadcast, its thread, its timeouts and its errors are all TRL's.
"""

from collections.abc import Callable, Iterator
from typing import Any

import requests
import torch


class _DraftRoutes:
    """TRL's vLLM client with the update session opened on the drafter instead of the policy."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def start_weight_update(self, timeout: int = 1800) -> None:
        response = requests.post(f"{self._client.server_url}/start_draft_weight_update", json={}, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(
                f"The vLLM server at {self._client.server_url} answered /start_draft_weight_update with "
                f"{response.status_code}: {response.text[:500]}. It must draft with a model (start it with "
                "`bebop-trl vllm-serve --mtp_head <head>`) and run vLLM >= 0.32."
            )


class NCCLDraftWeightTransfer:
    """TRL's `WeightTransferProtocol` over NCCL, as TRL's own client, plus the MTP head after an online update.

    Args:
        policy_transfer: TRL's `WeightTransferClient` that the trainer built for the policy.
        draft_weights: Returns the head's weights under the names of the exported draft checkpoint
            ([`vllm_draft_weights`][bebop_trl.modeling.vllm_export.vllm_draft_weights]), on the trainer's device.
    """

    def __init__(self, policy_transfer: Any, draft_weights: Callable[[], dict[str, torch.Tensor]]):
        self.policy_transfer = policy_transfer
        self._draft_weights = draft_weights
        self._head_stale = False

    # ------------------------------------------------------------------------------------------ TRL's protocol

    def init_weight_transfer(self) -> None:
        self.policy_transfer.init_weight_transfer()

    def pause(self) -> None:
        self.policy_transfer.pause()

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Sends the policy with TRL's client, then the head if it changed since the last sync (in the same pause)."""
        self.policy_transfer.send_weights(iterator)
        if self._head_stale:
            self.push_head()

    def resume(self) -> None:
        self.policy_transfer.resume()

    def destroy(self) -> None:
        self.policy_transfer.destroy()

    # ------------------------------------------------------------------------------------------ the head

    def head_updated(self) -> None:
        """Marks the head as changed: the next sync sends it to the server's drafter."""
        self._head_stale = True

    def push_head(self) -> None:
        """Broadcasts the head into the server's drafter over the policy's NCCL group (call within a pause)."""
        from trl.experimental.async_grpo.weight_transfer import WeightTransferClient

        weights = self._draft_weights()
        policy = self.policy_transfer
        head_transfer = WeightTransferClient(
            vllm_client=_DraftRoutes(policy.vllm),
            weight_update_info={
                "names": list(weights),
                "dtype_names": [str(t.dtype).removeprefix("torch.") for t in weights.values()],
                "shapes": [list(t.shape) for t in weights.values()],
            },
            weight_sync_timeout=policy.weight_sync_timeout,
        )
        head_transfer.model_update_group = policy.model_update_group
        head_transfer.send_weights(iter(weights.items()))
        self._head_stale = False
