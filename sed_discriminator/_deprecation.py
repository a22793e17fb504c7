"""Keeping 0.2's calls working for one release, with a ``DeprecationWarning`` that names the new form."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["keyword_only_since", "warn_deprecated"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(message: str, *, stacklevel: int = 3) -> None:
    """A ``DeprecationWarning`` pointing at the caller's caller."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def keyword_only_since(version: str, *names: str) -> Callable[[F], F]:
    """Let the keyword-only parameters ``names`` still be passed positionally, in this order, with a warning.

    The decorated function keeps its keyword-only signature (``inspect.signature`` shows it).
    """

    def decorate(fn: F) -> F:
        positional = sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in inspect.signature(fn).parameters.values()
        )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__qualname__}() takes {positional} positional arguments, got {len(args)}.")
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got multiple values for argument {name!r}.")
                    kwargs[name] = value
                given = ", ".join(f"{n}=..." for n in names[: len(extra)])
                warn_deprecated(
                    f"{fn.__qualname__}(): passing {given.replace('=...', '')} positionally is deprecated since "
                    f"{version} and will fail in the next release; pass it by keyword: {given}."
                )
                args = args[:positional]
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
