"""A name -> factory registry shared by losses, models, datasets and optimizers."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distkd.errors import ConfigError, UnknownNameError

T = TypeVar("T")


def accepted_arguments(factory: Callable[..., object]) -> list[str] | None:
    """The keyword arguments ``factory`` takes, or None when it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def nearest(name: str, choices: list[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""`` if none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Maps names to factories; ``kind`` names what is registered, for error messages.

    >>> losses = Registry("loss")
    >>> @losses.register("dist")
    ... class DIST: ...
    >>> losses.get("dist") is DIST
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a factory under ``name`` (lower case, unique)."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = factory
            return factory

        return add

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; an unknown name lists the known ones."""
        key = name.lower()
        if key not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{nearest(key, list(self._entries))}; known: {known}"
            )
        return self._entries[key]

    def build(self, name: str, **kwargs: object) -> T:
        """Call the factory registered as ``name`` with ``kwargs``; an argument it does not take is a one-line
        ConfigError naming the valid ones."""
        factory = self.get(name)
        valid = accepted_arguments(factory)
        unknown = [key for key in kwargs if valid is not None and key not in valid]
        if unknown:
            hint = nearest(unknown[0], valid) if valid else ""
            raise ConfigError(f"{self.kind} '{name}' has no argument '{unknown[0]}'{hint}; valid: "
                              f"{', '.join(valid) or 'none'}")
        return factory(**kwargs)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
