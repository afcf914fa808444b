"""Hook lists and hook names: the one place that reads what users pass as hooks and name filters.

`flatten_hooks` turns a single `(name, fn)` pair, a list of pairs or nested lists of them (e.g.
`[ablate(model, r), add(model, v, layers=1), H.at(...)]`) into a flat list of pairs, so that
`model.hooks`, `model.run_with_hooks` and `model.generate(hooks=...)` accept the same shapes.
A name is a hook point name, a glob ("blocks.*.hook_resid_post", matched with `fnmatch`) or a
callable filter `f(name) -> bool`; `name_filter` turns a glob into a `GlobFilter` callable that
prints as its pattern, so that "matches no hook point" errors can name it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Callable, Union

HookName = Union[str, Callable[[str], bool]]
HookPair = tuple[HookName, Callable]
_GLOB_CHARS = "*?["


def is_glob(name: Any) -> bool:
    """True for a string with fnmatch wildcards (`*`, `?`, `[`).

    Example:
        >>> is_glob("blocks.*.hook_resid_post"), is_glob("blocks.3.hook_resid_post")
        (True, False)
    """
    return isinstance(name, str) and any(c in name for c in _GLOB_CHARS)


class GlobFilter:
    """A hook name filter from a glob pattern; `repr` is the pattern (for error messages).

    Example:
        >>> GlobFilter("blocks.*.hook_resid_post")("blocks.3.hook_resid_post")
        True
    """

    def __init__(self, pattern: str):
        self.pattern = pattern

    def __call__(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def __repr__(self) -> str:
        return repr(self.pattern)


def name_filter(name: HookName) -> HookName:
    """A glob becomes a `GlobFilter`; hook point names and callables are returned unchanged.

    Example:
        >>> name_filter("blocks.*.hook_resid_post")   # a GlobFilter, usable as a TransformerLens filter
        'blocks.*.hook_resid_post'
    """
    return GlobFilter(name) if is_glob(name) else name


def no_match_message(name: HookName, hook_names) -> str:
    """The error for a glob or filter that selects no hook point, with close globs when there are any.

    Example:
        >>> no_match_message("blocks.*.hook_resid_pots", model.hook_dict)
        "No hook point matches the glob 'blocks.*.hook_resid_pots' (did you mean 'blocks.*.hook_resid_post', ...?). ..."
    """
    if isinstance(name, GlobFilter) or is_glob(name):
        pattern = name.pattern if isinstance(name, GlobFilter) else name
        generic = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in hook_names})
        close = difflib.get_close_matches(pattern, generic, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        return f"No hook point matches the glob {pattern!r}{hint}. See `model.hook_dict` for all names."
    return (
        f"The name filter {getattr(name, '__name__', repr(name))} selects no hook point, so a hook or cache on it "
        "would never run. See `model.hook_dict` for all names."
    )


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and (isinstance(item[0], str) or callable(item[0]))
        and callable(item[1])
    )


def flatten_hooks(hooks: Any, argument: str = "hooks") -> list[HookPair]:
    """A flat list of `(name, fn)` pairs from a pair, a list of pairs or nested lists (globs kept as
    `GlobFilter`s); anything else raises a TypeError naming the element and where it was.

    Example:
        >>> flatten_hooks([ablate(model, r), ("hook_embed", fn), [H.at("blocks.*.hook_resid_pre", fn2)]])
        [('blocks.0.hook_resid_pre', EditHook(...)), ..., ('hook_embed', fn), ('blocks.*.hook_resid_pre', ...)]
    """
    out: list[HookPair] = []

    def visit(item: Any, where: str) -> None:
        if _is_pair(item):
            out.append((name_filter(item[0]), item[1]))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            raise TypeError(f"{where} is {_describe(item)}: its hook function {_describe(item[1])} is not callable.")
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                visit(sub, f"{where}[{i}]")
        else:
            raise TypeError(
                f"{where} is {_describe(item)}; {argument} takes a (name, fn) pair, a list of pairs or nested "
                "lists of them, where name is a hook point name, a glob or a filter callable and fn is callable "
                "(e.g. H.at(...), ablate(model, r), [(\"blocks.0.hook_resid_post\", fn)])."
            )

    if hooks is None:
        return out
    visit(hooks, argument)
    return out


def _describe(item: Any) -> str:
    text = repr(item)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(item).__name__})"


__all__ = ["GlobFilter", "HookName", "HookPair", "flatten_hooks", "is_glob", "name_filter", "no_match_message"]
