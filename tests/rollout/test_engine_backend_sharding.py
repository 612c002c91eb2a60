"""Async torch-engine rollouts refuse sharded policies, which their background snapshot cannot copy."""

from types import SimpleNamespace

import pytest

from bebop_trl.rollout.engine_backend import check_unsharded


def trainer_with(deepspeed_stage: int | None = None, fsdp: bool = False) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=deepspeed_stage)
    return SimpleNamespace(
        is_deepspeed_enabled=deepspeed_stage is not None,
        is_fsdp_enabled=fsdp,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
    )


@pytest.mark.parametrize(("stage", "fsdp", "named"), [(3, False, "DeepSpeed ZeRO-3"), (None, True, "FSDP")])
def test_sharded_policies_are_refused(stage, fsdp, named):
    with pytest.raises(ValueError, match=f"which {named} shards"):
        check_unsharded(trainer_with(stage, fsdp))


@pytest.mark.parametrize("stage", [None, 1, 2])
def test_whole_policies_pass(stage):
    check_unsharded(trainer_with(stage))
