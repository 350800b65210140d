"""The errors lorax raises. Each message says what was wrong, what was expected, and
the nearest valid choice, so a user can fix the call without reading our source."""

import difflib
from collections.abc import Iterable


class LoraError(Exception):
    """Base class of every error raised by lorax and interop."""


class LoraConfigError(LoraError, ValueError):
    """A `LoraConfig` field has a bad value, or two fields conflict."""


class TargetError(LoraError, ValueError):
    """`target_modules` (or another module selector) does not fit the model."""


class UnsupportedOpError(LoraError, NotImplementedError):
    """A LoRA weight met a JAX primitive that has no factored rule."""


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The `n` choices closest to `name` (by difflib's ratio), best first.

    >>> nearest("q_prj", ["q_proj", "k_proj", "o_proj"], n=1)
    ['q_proj']
    """
    choices = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if close:
        return close
    # Dotted paths: compare the last component too ("q_proj" vs "model.layers.0.q_proj").
    by_last = {c.rsplit(".", 1)[-1]: c for c in choices}
    return [by_last[c] for c in difflib.get_close_matches(name, list(by_last), n=n, cutoff=0.5)]


def listing(names: Iterable[str], limit: int = 40) -> str:
    """A one-line listing of names, shortened past `limit` entries."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
