"""Errors that the `resattn` command reports as one clear line and a non-zero exit."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A mistake in what the user asked for (bad name, path, checkpoint, size): the message
    says what is wrong and how to fix it; the command prints it without a traceback."""
