"""Griffe extension for the API reference (mkdocs.yml: mkdocstrings `extensions:`).

The package's docstrings head their doctest-style snippets with `Example:`. Google style (as
Griffe reads it) knows only `Examples:` as an examples section and would render `Example:` as an
admonition of Markdown text, where `>>> x[0]["name"]` reads as a reference link. This extension
renames the heading before the docstring is parsed, so the snippets render as Python console code.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """`Example:` -> `Examples:` in every docstring the API reference loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
