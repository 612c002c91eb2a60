"""vLLM lane: the vLLM members of `bebop_trl._compat` are as recorded in the installed build (the default lane has
no vLLM, so its compatibility test skips them)."""

import pytest

from bebop_trl._compat import PRIVATE_MEMBERS

from ..test_compat import test_private_member_is_as_recorded as check_member


pytestmark = pytest.mark.vllm


@pytest.mark.parametrize(
    "entry", [m for m in PRIVATE_MEMBERS if m.checked[0].startswith("vllm")], ids=lambda entry: entry.path
)
def test_vllm_member_is_as_recorded(entry):
    check_member(entry)
