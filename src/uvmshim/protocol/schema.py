"""Typed wire structures: frozen, keyword-only records with a checked JSON form. STDLIB ONLY.

A :class:`Struct` subclass is written like a frozen, keyword-only dataclass and type-checks as
one (:func:`typing.dataclass_transform`)::

    class MountScsi(RequestBody):
        OP = Op.MOUNT_SCSI
        controller: Index
        guest_path: str = ""

It gets ``__init__``, ``__eq__``, ``__hash__`` and ``__repr__``, refuses attribute assignment,
and has :meth:`Struct.to_json` and :meth:`Struct.from_json`. ``from_json`` checks every field
against its annotation and raises :class:`ProtocolError` naming the message and the field.

Why not ``dataclasses`` itself: the agent imports every message class at each guest boot, and
under TCG ``import dataclasses`` (it imports ``inspect``) costs ~75 ms and each dataclass ~9 ms
(it compiles generated methods with ``exec``), i.e. ~270 ms for the request and event classes,
more than the whole agent takes to import. Here a class costs one pass over its annotations.

Field annotations are strings (``from __future__ import annotations``) and come from a closed
set, each with a checker: ``int``, ``Index`` (an int >= 0), ``str``, ``bool``, ``float``,
``bytes`` (base64 on the wire), ``StrList`` (a tuple of str; a JSON list on the wire), ``StrMap``
(str → str), ``JSONObject`` (any JSON object), each optionally ``| None``. Another annotation
is an error when the class is defined.
"""

from __future__ import annotations

import binascii

from uvmshim.protocol.messages import ProtocolError

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, Self, TypeAlias, dataclass_transform

    #: A non-negative integer (a LUN, a device number, a signal).
    Index: TypeAlias = int
    #: A list of strings; a tuple in Python so that messages stay immutable.
    StrList: TypeAlias = tuple[str, ...]
    #: A JSON object whose values are strings (an environment).
    StrMap: TypeAlias = dict[str, str]
    #: Any JSON object (an OCI spec, a process).
    JSONObject: TypeAlias = dict[str, Any]
    Checker = Callable[[object], Any]
else:
    def dataclass_transform(**_kw: object) -> object:
        return lambda cls: cls

#: Longest rendering of a bad value in an error message (a spec can be large).
_REPR_LIMIT = 60


class _Required:
    """The default of a field that has none."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


class Field:
    """One field of a :class:`Struct`: its name, annotation, checker and default."""

    __slots__ = ("annotation", "check", "default", "name")

    def __init__(self, name: str, annotation: str, check: Checker, default: object) -> None:
        self.name = name
        self.annotation = annotation
        self.check = check
        self.default = default

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.annotation!r}, default={self.default!r})"


class _Bad(Exception):
    """A value does not match a field; ``str()`` says what was expected."""


def _int(value: object) -> int:
    # bool is an int subclass; a JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad("an integer")
    return value


def _index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Bad("a non-negative integer")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad("a string")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad("a boolean")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Bad("a number")
    return float(value)


def _bytes(value: object) -> bytes:
    if not isinstance(value, str):
        raise _Bad("a base64 string")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _Bad("a base64 string") from None


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad("a list of strings")
    return tuple(value)


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Bad("an object of strings")
    return dict(value)


def _object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad("an object")
    return value


_CHECKERS: dict[str, Checker] = {
    "int": _int, "Index": _index, "str": _str, "bool": _bool, "float": _float, "bytes": _bytes,
    "StrList": _str_list, "StrMap": _str_map, "JSONObject": _object,
}


def _optional(check: Checker) -> Checker:
    def optional(value: object) -> Any:
        return None if value is None else check(value)
    return optional


def checker(annotation: str) -> Checker:
    """The checker of a field annotation (see the module docstring).

    :raises TypeError: for an annotation outside the closed set.
    """
    base, none, rest = annotation.partition(" | None")
    if base not in _CHECKERS or rest:
        raise TypeError(f"unsupported wire field type {annotation!r}")
    return _optional(_CHECKERS[base]) if none else _CHECKERS[base]


def _encode(value: object) -> object:
    if isinstance(value, bytes):
        return binascii.b2a_base64(value, newline=False).decode("ascii")
    if isinstance(value, tuple):
        return list(value)
    return value


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "…"


@dataclass_transform(kw_only_default=True, frozen_default=True)
class Struct:
    """Base of every typed wire structure (see the module docstring)."""

    #: The fields, in definition order (set for each subclass).
    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # Not inspect.get_annotations: inspect costs ~60 ms of guest boot under TCG.
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        fields = list(cls.FIELDS)
        for name, annotation in own.items():
            if annotation.startswith("ClassVar"):
                continue
            fields.append(Field(name, annotation, checker(annotation),
                                cls.__dict__.get(name, REQUIRED)))
        cls.FIELDS = tuple(fields)

    def __init__(self, **values: Any) -> None:
        for f in self.FIELDS:
            if f.name in values:
                value = values.pop(f.name)
            elif f.default is REQUIRED:
                raise TypeError(f"{type(self).__name__}() needs {f.name}=")
            else:
                value = f.default
            object.__setattr__(self, f.name, value)
        if values:
            raise TypeError(f"{type(self).__name__}() has no field {sorted(values)[0]!r}")

    @classmethod
    def wire_name(cls) -> str:
        """The name errors use for this structure (the operation or event name)."""
        return cls.__name__

    def to_json(self) -> dict[str, Any]:
        """Return the wire form: one JSON object, every field present."""
        return {f.name: _encode(getattr(self, f.name)) for f in self.FIELDS}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        """Check ``obj`` field by field and build the structure; absent fields take defaults.

        :raises ProtocolError: ``<name>: <field> must be <what>, got <value>``, for a missing
            or mistyped field, or ``<name>: unknown field <field>``.
        """
        name = cls.wire_name()
        if not isinstance(obj, dict):
            raise ProtocolError(f"{name}: arguments must be a JSON object, got {_brief(obj)}")
        values: dict[str, Any] = {}
        for f in cls.FIELDS:
            if f.name not in obj:
                if f.default is REQUIRED:
                    raise ProtocolError(f"{name}: {f.name} is missing")
                continue
            try:
                values[f.name] = f.check(obj[f.name])
            except _Bad as err:
                raise ProtocolError(
                    f"{name}: {f.name} must be {err}, got {_brief(obj[f.name])}") from None
        names = {f.name for f in cls.FIELDS}
        unknown = sorted(k for k in obj if k not in names)
        if unknown:
            raise ProtocolError(f"{name}: unknown field {unknown[0]!r}")
        return cls(**values)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in self.FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot assign {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Struct) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({inner})"
