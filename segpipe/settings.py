"""Settings dataclasses that check themselves: the one ``from_dict`` and the field checks they share.

Every stage keeps its settings where it uses them (``data.settings.DataConfig``,
``data.augment.AugmentSettings``, ``data.preprocess.PreprocessSettings``,
``inference.settings.InferenceSettings``, the config's ``ModelConfig`` and ``TrainConfig``) and
checks them when they are made, in ``__post_init__``: a settings object built in Python is checked
as one read from YAML or JSON is. The config (:mod:`segpipe.config`) is built on them.

One convention reads them from a mapping: ``Cls.from_dict(data, *, where=None, prefix="")``. It
rejects unknown keys (naming the closest valid one), checks each value against the field's type and
the range in its metadata (``field(metadata=number_range(...))``), builds nested settings, and
words every error as "[where: ]Expected … Received: <prefix><key>=value" (a :class:`SettingError`).
``prefix`` is the settings' key path in the file (``"data."``, ``"preprocessing."``).

Examples
--------
>>> from dataclasses import dataclass, field
>>> @dataclass
... class Window(Settings):
...     size: int = field(default=8, metadata=number_range(1))
>>> Window.from_dict({"size": 4})
Window(size=4)
>>> Window.from_dict({"size": 0}, prefix="window.")
Traceback (most recent call last):
...
segpipe.errors.SettingError: Expected >= 1. Received: window.size=0.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from typing import Any, Literal, Mapping, TypeVar

from segpipe.errors import Received, SettingError, expected

T = TypeVar("T")


def is_number(value: Any, *, finite: bool = False) -> bool:
    """A real number (Python or NumPy) that is not a bool (YAML's ``true`` is no number); ``finite``: not NaN or inf.

    The one test of "is this a number" of segpipe's settings and options.

    Examples
    --------
    >>> is_number(0.5), is_number(3), is_number(True), is_number("1"), is_number(float("nan"), finite=True)
    (True, True, False, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def number_range(minimum: float | None = None, maximum: float | None = None, *,
                 exclusive_min: bool = False) -> dict[str, Any]:
    """Field metadata: the range each number of the field must lie in (checked by :func:`check_fields`)."""
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


class Settings:
    """Mixin of a settings dataclass: ``from_dict(data, *, where=None, prefix="")``."""

    @classmethod
    def from_dict(cls: type[T], data: Any, *, where: str | None = None, prefix: str = "") -> T:
        """Build the settings from a mapping; see the module docstring.

        Raises
        ------
        SettingError
            Not a mapping, an unknown key, a value of the wrong type or out of range, or a check of
            the settings themselves; the message names ``where`` and ``prefix`` + the key.
        """
        return from_dict(cls, data, where=where, prefix=prefix)


def from_dict(cls: type[T], data: Any, *, where: str | None = None, prefix: str = "") -> T:
    """Build settings dataclass ``cls`` from ``data``, checking keys, types and ranges (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise SettingError(prefix.rstrip(".") or "settings", "a mapping", data, where=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            section = None if prefix else getattr(cls, "SECTION", cls.__name__)
            raise UnknownKeyError(prefix, str(key), list(fields), data[key], where=where, section=section)
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = convert(value, hints[name], f"{prefix}{name}", where=where)
        check_range(kwargs[name], fields[name].metadata, f"{prefix}{name}", where=where)
    try:
        return cls(**kwargs)
    except SettingError as exc:  # the settings' own checks name the key relative to them: add the path once
        raise exc.with_prefix(prefix, where=where) from None


def check_fields(settings: Any) -> None:
    """Check (and normalise: ``1`` -> ``1.0`` for a float, a list -> a tuple) every field of ``settings``.

    For ``__post_init__``: the same type and range checks as :func:`from_dict`, on an object built in
    Python. Keys are the field names; :func:`from_dict` puts the path in front.
    """
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        value = convert(getattr(settings, f.name), hints[f.name], f.name)
        check_range(value, f.metadata, f.name)
        object.__setattr__(settings, f.name, value)  # frozen dataclasses too


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert(value: Any, tp: Any, key: str, *, where: str | None = None) -> Any:
    """``value`` checked against type ``tp`` (and converted: int -> float, list -> tuple, mapping -> settings)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:
            return convert(value, alternatives[0], key, where=where)
        for alternative in alternatives:  # e.g. str | list[str]: the first that fits
            try:
                return convert(value, alternative, key, where=where)
            except SettingError:
                continue
        raise SettingError(key, " or ".join(_describe(a) for a in alternatives), value, where=where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value  # it checked itself when it was made
        return from_dict(tp, {} if value is None else value, where=where, prefix=f"{key}.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a boolean: map it back
            value = next((a for a in args if isinstance(a, str) and _yaml_bool(a) is value), value)
        if value not in args:
            raise SettingError(key, f"one of {list(args)}", value, where=where, hint=_close(value, args))
        return value
    if origin in (list, tuple):  # list[T], tuple[T, ...] (frozen settings)
        if not isinstance(value, (list, tuple)):
            raise SettingError(key, f"a list of {_name(args[0])}", value, where=where)
        items = [convert(v, args[0], f"{key}[{i}]", where=where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise SettingError(key, "a mapping", value, where=where)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingError(key, "true or false", value, where=where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(key, "an integer", value, where=where)
        return value
    if tp is float:
        if not is_number(value):
            raise SettingError(key, "a number", value, where=where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SettingError(key, "a string", value, where=where)
        return value
    # a bug in the settings class (a type this reader cannot check), not in the settings
    raise TypeError(expected("a settings type this reader checks", key=key, received=Received(repr(tp))))


def check_range(value: Any, meta: Mapping[str, Any], key: str, *, where: str | None = None) -> None:
    """Every number of ``value`` (a number or a list) within the field metadata's ``min``/``max``."""
    if not meta or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    lo, hi, exclusive = meta.get("min"), meta.get("max"), meta.get("exclusive_min")
    for v in values:
        if not is_number(v):
            continue  # a type error, reported by convert
        if lo is not None and (v <= lo if exclusive else v < lo):
            raise SettingError(key, f"{'>' if exclusive else '>='} {lo}", list(value) if isinstance(value, tuple)
                               else value, where=where)
        if hi is not None and v > hi:
            raise SettingError(key, f"<= {hi}", list(value) if isinstance(value, tuple) else value, where=where)


class UnknownKeyError(SettingError):
    """An unknown key, shown with its value and the valid keys of its section.

    "Expected a key of data (root, ...). Received: data.patch_sise=[...]. Did you mean 'data.patch_size'?"
    The section and the suggestion are worded from the key's full path, also after :meth:`with_prefix`.
    """

    def __init__(self, prefix: str, key: str, valid: list[str], value: Any, *, where: str | None = None,
                 section: str | None = None):
        self.prefix, self.name, self.valid, self.section = prefix, key, list(valid), section
        close = difflib.get_close_matches(key, self.valid, n=1)
        hint = f"Did you mean '{prefix}{close[0]}'?" if close else None
        shown = section or prefix.rstrip(".") or "the top level"
        super().__init__(f"{prefix}{key}", f"a key of {shown} ({', '.join(self.valid)})", value, where=where,
                         hint=hint)

    def with_prefix(self, prefix: str, *, where: str | None = None) -> "UnknownKeyError":
        # a section named after a class ("a key of InferenceSettings") gives way to the path once there is one
        section = self.section if not (prefix + self.prefix) else None
        return UnknownKeyError(prefix + self.prefix, self.name, self.valid, self.received,
                               where=self.where or where, section=section)


def unknown_key(prefix: str, key: str, valid: list[str], value: Any, *, where: str | None = None,
                section: str | None = None) -> UnknownKeyError:
    """An :class:`UnknownKeyError` for ``prefix`` + ``key`` (``section`` names the settings when there is no prefix)."""
    return UnknownKeyError(prefix, key, valid, value, where=where, section=section)


def _close(value: Any, choices: tuple) -> str | None:
    if not isinstance(value, str):
        return None
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
    return f"Did you mean {close[0]!r}?" if close else None


def _yaml_bool(text: str) -> bool | None:
    return {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}.get(text.lower())


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any) -> str:
    """``str`` -> 'a string', ``list[str]`` -> 'a list of str' (for union error messages)."""
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, _name(tp))


__all__ = ["SettingError", "Settings", "check_fields", "check_range", "convert", "from_dict",
           "is_number", "number_range", "unknown_key", "UnknownKeyError"]
