"""Renamed keywords and attributes that keep working for one release, with a `DeprecationWarning`.

Why one place: every rename warns with the same sentence, which names the new spelling and
starts with "diffusion_lens renamed" (the test suite turns exactly these warnings into errors, so
the library, its docs and its tests never use an old name by accident). The warning points at
the caller's line (`stacklevel`), so Python's default filter shows it once per call site.

Example:
    >>> def at(name, fn, *, denoise_blocks=None, **deprecated):
    ...     denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="H.at")
    ...     no_keywords_left(deprecated, "H.at")
    >>> class State:
    ...     cfg = renamed_attribute("cfg", "guidance", "DenoisingState")
"""

from __future__ import annotations

import warnings
from typing import Any

_REMOVAL = "the old name works until the next release"


def renamed_keyword(
    kwargs: dict[str, Any], old: str, new: str, value: Any, *, where: str, default: Any = None, stacklevel: int = 3
) -> Any:
    """The value to use for keyword `new`: `kwargs.pop(old)` with a warning when the old name was passed.

    `kwargs` is the function's `**deprecated` catch-all, `value` what `new` received and `default`
    its default: a `new` that differs from its default together with `old` is a TypeError (which
    one was meant is unclear). `stacklevel=3` points the warning at the caller of the function
    that calls this helper.

    Example:
        >>> renamed_keyword({"blocks": 1}, "blocks", "denoise_blocks", None, where="H.at")   # warns
        1
        >>> renamed_keyword({}, "blocks", "denoise_blocks", 2, where="H.at")
        2
    """
    if old not in kwargs:
        return value
    if not _is_default(value, default):
        raise TypeError(f"{where}() got both {old}= and {new}=; {old}= is the old name of {new}=: pass only {new}=.")
    warnings.warn(
        f"diffusion_lens renamed {where}({old}=...) to {where}({new}=...); {_REMOVAL}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return kwargs.pop(old)


def no_keywords_left(kwargs: dict[str, Any], where: str) -> None:
    """Raise the TypeError Python would for keywords that are neither a parameter nor a renamed one.

    Example:
        >>> no_keywords_left({"blokcs": 1}, "H.at")   # TypeError: H.at() got an unexpected keyword argument 'blokcs'
    """
    if kwargs:
        names = ", ".join(repr(name) for name in kwargs)
        raise TypeError(f"{where}() got an unexpected keyword argument {names}.")


def renamed_attribute(old: str, new: str, where: str) -> property:
    """A read-only property `old` that warns and returns the attribute `new`.

    Example:
        >>> class DenoisingState:
        ...     cfg = renamed_attribute("cfg", "guidance", "DenoisingState")
    """

    def read(self) -> Any:
        warnings.warn(
            f"diffusion_lens renamed {where}.{old} to {where}.{new}; {_REMOVAL}.", DeprecationWarning, stacklevel=2
        )
        return getattr(self, new)

    read.__name__ = old
    read.__doc__ = f"Deprecated alias of `{new}` (warns; {_REMOVAL})."
    return property(read)


def _is_default(value: Any, default: Any) -> bool:
    """`value is default`, or an equal str / int / float / bool (literal defaults need not be identical)."""
    literal = isinstance(value, (str, int, float, bool)) and type(value) is type(default)
    return value is default or (literal and value == default)


__all__ = ["no_keywords_left", "renamed_attribute", "renamed_keyword"]
