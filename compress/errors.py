"""Errors a user can act on. Each prints as one line; the CLI maps them to exit codes."""

from __future__ import annotations


class CompressError(Exception):
    """Base for every error we raise on purpose: its message is the whole story."""

    exit_code = 1


class RecipeError(CompressError):
    """The recipe (or what it points at) is wrong; nothing has run yet."""

    exit_code = 2


class StageError(CompressError):
    """A stage could not do its work (bad ratio for this model, parity failure, ...)."""

    exit_code = 1


class GateFailed(CompressError):
    """Every card was written, and a gate says the result is not good enough."""

    exit_code = 3


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, or its type when it has none.

    Libraries raise multi-line messages (optimum, onnxruntime, pydantic) and sometimes empty
    ones; a report card and a terminal need exactly one line, and never an IndexError from
    `str(e).splitlines()[0]` on an empty message.
    """
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__
