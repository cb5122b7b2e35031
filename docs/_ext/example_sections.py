"""Griffe extension for the API reference (mkdocs.yml): render the package's ``Example:`` sections as doctests.

The package's docstrings head their doctests ``Example:`` (Google style's singular). Griffe's Google parser renders
only an ``Examples:`` section as code; under any other title the ``>>>`` lines would be read as Markdown (block
quotes, and ``[...]`` as reference links, which `mkdocs build --strict` rejects). The title is renamed when the
object is loaded; the package itself is not changed.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
