"""The private members of TRL, transformers and vLLM listed in `bebop_trl._compat` are still there, as recorded."""

import importlib
import importlib.metadata
import inspect
import re
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from bebop_trl import _compat
from bebop_trl._compat import PRIVATE_MEMBERS, PrivateMember
from bebop_trl.vllm_plugin.compat import VLLM_DISTRIBUTIONS


# The distributions that install a requirement's package: vLLM's CPU build is a distribution of its own.
PROVIDERS = {"vllm": VLLM_DISTRIBUTIONS}


def installed(requirement: str) -> tuple[str, bool]:
    """The installed distribution of `requirement` ("name version") and whether its version is in the range."""
    parsed = Requirement(requirement)
    for distribution in PROVIDERS.get(parsed.name, (parsed.name,)):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return f"{distribution} {version}", parsed.specifier.contains(Version(version), prereleases=True)
    return f"{parsed.name} (no distribution found)", False


def resolve(path: str) -> Any:
    """The module or class at a dotted import path: the longest importable module, then attributes."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            owner = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # the module exists, and one of its own imports failed
                raise
            continue
        for attribute in parts[end:]:
            owner = getattr(owner, attribute)
        return owner
    raise ModuleNotFoundError(path)


def assigned_on_instances(owner: type, name: str) -> bool:
    """Whether a class of `owner`'s hierarchy assigns `self.<name>` (an attribute that only instances have)."""
    assignment = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=(?!=)")
    for cls in owner.__mro__:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # builtins, and classes without a source file
            continue
        if assignment.search(source):
            return True
    return False


def problems_of(entry: PrivateMember) -> list[str]:
    """What no longer holds of `entry` in the installed dependencies."""
    owner = resolve(entry.owner)
    if hasattr(owner, entry.name):
        member = getattr(owner, entry.name)
    elif inspect.isclass(owner) and entry.params is None and assigned_on_instances(owner, entry.name):
        member = None
    else:
        return ["it no longer exists"]
    problems = []
    if entry.params is not None:
        if not callable(member):
            return [f"it is no longer callable (found a {type(member).__name__})"]
        found = tuple(inspect.signature(member).parameters)
        if found != entry.params:
            missing = [p for p in entry.params if p not in found]
            new = [p for p in found if p not in entry.params]
            change = ", ".join(
                part
                for part in (
                    f"no longer has {missing}" if missing else "",
                    f"has new {new}" if new else "",
                    "" if missing or new else "has them in another order",
                )
                if part
            )
            problems.append(f"its parameters changed: it {change}; recorded {entry.params}, found {found}")
    if entry.source_contains:
        source = inspect.getsource(owner)
        absent = [text for text in entry.source_contains if text not in source]
        if absent:
            problems.append(f"the source of {entry.owner} no longer contains {absent}")
    if entry.name not in (_compat.__doc__ or ""):
        problems.append("the list in the docstring of bebop_trl._compat does not name it")
    return problems


@pytest.mark.parametrize("entry", PRIVATE_MEMBERS, ids=lambda entry: entry.path)
def test_private_member_is_as_recorded(entry: PrivateMember):
    for requirement in entry.checked:
        pytest.importorskip(Requirement(requirement).name)
    problems = problems_of(entry)
    if problems:
        versions = []
        for requirement in entry.checked:
            version, in_range = installed(requirement)
            versions.append(f"{version}{'' if in_range else ', outside the checked range'}")
        pytest.fail(
            f"{entry.path} ({entry.kind}, used by bebop_trl.{entry.used_by}; checked on {', '.join(entry.checked)}; "
            f"installed: {'; '.join(versions)}): {'; '.join(problems)}. Check the use against the new version, then "
            "update its entry in bebop_trl/_compat.py.",
            pytrace=False,
        )
