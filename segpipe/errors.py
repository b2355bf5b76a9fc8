"""The one way segpipe words an error: "Expected … Received: key=value" (Keras's convention).

A message names what was wrong once: the key (a config key path like ``data.augment.rotation.p``,
an argument or a JSON key), what was expected, and what was received. Where the problem is in a
file, the file comes first::

    >>> expected("a number in [0, 0.95]", key="inference.overlap", received=0.99)
    'Expected a number in [0, 0.95]. Received: inference.overlap=0.99.'
    >>> expected("3 positive integers", key="patch_size", received=[1, 2], where="bundle/bundle.json")
    'bundle/bundle.json: Expected 3 positive integers. Received: patch_size=[1, 2].'

:class:`SettingError` carries the key separately, so a caller that knows where a setting sits (the
config loader) can put its path in front without repeating the key.
"""
from __future__ import annotations

from typing import Any

MAX_SHOWN = 2000  # characters of a received value shown in a message


def expected(what: str, *, key: str, received: Any, where: str | None = None, hint: str | None = None) -> str:
    """The message "[where: ]Expected <what>. Received: <key>=<received!r>.[ <hint>]".

    Parameters
    ----------
    what : str
        What a valid value looks like ("an integer >= 1", "one of ['a', 'b']").
    key : str
        The key, argument or config path that holds the value.
    received : object
        The value received; strings are shown quoted (``repr``). Pass a string you build yourself
        as ``Received(...)`` to show it unquoted.
    where : str, optional
        The file (or other place) the value came from.
    hint : str, optional
        One more sentence: how to fix it, or the closest valid choice.
    """
    shown = received.text if isinstance(received, Received) else repr(received)
    if len(shown) > MAX_SHOWN:  # a value from an untrusted file may be huge
        shown = shown[: MAX_SHOWN - 3] + "..."
    prefix = f"{where}: " if where else ""
    suffix = f" {hint}" if hint else ""
    return f"{prefix}Expected {what}. Received: {key}={shown}.{suffix}"


def first_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, first line only and at most 300 characters (for one-line errors).

    Examples
    --------
    >>> first_line(ValueError("bad value\\nmore detail"))
    'ValueError: bad value'
    """
    text = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


class Received:
    """A received value shown as given, not quoted (e.g. ``Received("3 files")``)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class SettingError(ValueError):
    """An invalid setting; knows its key, so a caller can prefix the key's path (``with_prefix``).

    ``where`` is the file the setting came from, if any (named first in the message).

    Examples
    --------
    >>> err = SettingError("overlap", "a number in [0, 1)", 1.5)
    >>> str(err)
    'Expected a number in [0, 1). Received: overlap=1.5.'
    >>> str(err.with_prefix("inference."))
    'Expected a number in [0, 1). Received: inference.overlap=1.5.'
    >>> str(err.with_prefix("inference.", where="bundle.json"))
    'bundle.json: Expected a number in [0, 1). Received: inference.overlap=1.5.'
    """

    def __init__(self, key: str, what: str, received: Any, *, hint: str | None = None, where: str | None = None):
        self.key, self.what, self.received, self.hint, self.where = key, what, received, hint, where
        super().__init__(expected(what, key=key, received=received, hint=hint, where=where))

    def with_prefix(self, prefix: str, *, where: str | None = None) -> "SettingError":
        """The same error with ``prefix`` before the key (and ``where`` if it had none)."""
        return SettingError(prefix + self.key, self.what, self.received, hint=self.hint, where=self.where or where)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key (``segpipe.config`` re-exports it)."""


class StorageError(OSError):
    """A folder that cannot be written (full disk, read-only, a file in the way); names the path."""
