"""Griffe extension for the API reference: config fields documented in `field(metadata={"help": ...})`.

The trainer configs document each field the TRL way, in its `metadata["help"]` (which `TrlParser` turns into the
command-line help). This extension makes that text the field's docstring and shows the field's default instead of
the `field(...)` call, so that mkdocstrings renders every config field with its description.
"""

import ast

import griffe


class FieldHelp(griffe.Extension):
    """Sets the docstring of `name: type = field(default=..., metadata={"help": "..."})` class attributes."""

    def on_attribute_instance(self, *, node, attr, agent, **kwargs) -> None:
        if not isinstance(node, ast.AnnAssign) or not attr.parent or not attr.parent.is_class:
            return
        call = node.value
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "field"):
            return
        keywords = {k.arg: k.value for k in call.keywords}
        help_text = _help(keywords.get("metadata"))
        if help_text and attr.docstring is None:
            attr.docstring = griffe.Docstring(help_text, lineno=node.lineno, parent=attr)
        if "default" in keywords:
            attr.value = griffe.safe_get_expression(keywords["default"], parent=attr.parent)


def _help(metadata: ast.AST | None) -> str | None:
    if not isinstance(metadata, ast.Dict):
        return None
    for key, value in zip(metadata.keys, metadata.values, strict=True):
        is_help = isinstance(key, ast.Constant) and key.value == "help"
        if is_help and isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
    return None
