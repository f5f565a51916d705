"""The errors distkd raises for bad input.

Every message says what is wrong and what to do about it, on one line; the CLI prints
``error: <message>`` and exits with status 2. Subclasses also derive from the built-in
exception a Python user would expect (``ValueError``, ``FileNotFoundError``) so plain
``except ValueError`` keeps working.
"""

from __future__ import annotations


class DistkdError(Exception):
    """Base class of every error distkd raises on purpose."""


class ConfigError(DistkdError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, value out of range)."""


class UnknownNameError(DistkdError, ValueError):
    """A name (model, loss, dataset, optimizer, ...) is not in its registry."""


class CheckpointError(DistkdError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class DataError(DistkdError, ValueError):
    """A dataset is missing, malformed, or inconsistent with the config."""


class ShapeError(DistkdError, ValueError):
    """Tensors given to a loss or model have shapes that do not fit together."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ExportError(DistkdError, RuntimeError):
    """A model cannot be exported in the asked format, or the exported file does not reproduce its outputs."""
