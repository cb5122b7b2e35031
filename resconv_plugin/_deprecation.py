"""Retiring a name: it keeps working for one release and warns with a ``FutureWarning`` that names its successor.

``FutureWarning`` as timm does for the names it moved (shown by default, unlike ``DeprecationWarning``, which Python
hides outside ``__main__``: these warnings are for the users of the library, not only its developers).

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_renamed("old_name", "new_name")
    >>> print(caught[0].message)
    old_name is deprecated and will be removed in the next release: use new_name
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping, Tuple

__all__ = ["warn_renamed", "renamed_attributes"]


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn (``FutureWarning``) that ``old`` is deprecated in favour of ``new``.

    Args:
        old: the retired name, as the user wrote it.
        new: what to use instead.
        stacklevel: as in :func:`warnings.warn` (the default points at the caller of the function that warns).
    """
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}", FutureWarning,
                  stacklevel=stacklevel)


def renamed_attributes(module: str, renamed: Mapping[str, Tuple[str, str]]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) that serves retired names with a warning.

    Args:
        module: the module's ``__name__``.
        renamed: ``{old name: (module that holds it now, its name there)}``; the module is imported on first use
            (so a lazy name costs nothing until it is used and import cycles stay out).

    Example:
        >>> __getattr__ = renamed_attributes(__name__, {"OldThing": ("collections", "OrderedDict")})
    """

    def __getattr__(name: str) -> Any:
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, new = renamed[name]
        warn_renamed(f"{module}.{name}", f"{where}.{new}")
        return getattr(importlib.import_module(where), new)

    return __getattr__
