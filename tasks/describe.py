"""Wire types in words, for error messages: "an integer from 1 to 100", "one of 'sync', 'async'".

Read from the schema's own annotations (``msgspec.inspect``), so a limit written once in
``schema.py`` is the limit every message states.
"""

from __future__ import annotations

from typing import Any

import msgspec.inspect as mi

from imagewire.tasks import schema


def _unannotated(t: mi.Type) -> mi.Type:
    return t.type if isinstance(t, mi.Metadata) else t


def non_null(t: mi.Type) -> list[mi.Type]:
    """The members of a type that are not None, each without its annotation (``Meta``) wrapper."""
    t = _unannotated(t)
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    return [member for member in map(_unannotated, members) if not isinstance(member, mi.NoneType)]


def extra(t: mi.Type) -> dict[str, Any]:
    """The ``Meta(extra=...)`` of a type, or of its members."""
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    found: dict[str, Any] = {}
    for member in members:
        if isinstance(member, mi.Metadata) and member.extra:
            found.update(member.extra)
    return found


def literal_values(t: mi.Type) -> list[Any] | None:
    for member in non_null(t):
        if isinstance(member, mi.LiteralType):
            return list(member.values)
    return None


def wire_type(t: mi.Type) -> str:
    """The JSON type name an error item's ``type`` carries: "integer", "string", …"""
    kinds = {
        mi.IntType: "integer", mi.FloatType: "number", mi.StrType: "string", mi.BoolType: "boolean",
        mi.LiteralType: "string", mi.ListType: "array", mi.DictType: "object",
        mi.TupleType: "array", mi.StructType: "object",
    }
    names: list[str] = []
    for member in non_null(t):
        name = kinds.get(type(member), "value")
        if name not in names:
            names.append(name)
    return " or ".join(names)


def describe_type(t: mi.Type) -> str:
    return " or ".join(_describe_one(member) for member in non_null(t))


def describe_annotation(annotation: Any) -> str:
    """``describe_type`` of a schema annotation such as ``schema.Steps``."""
    return describe_type(mi.type_info(annotation))


def _describe_one(t: mi.Type) -> str:
    if isinstance(t, (mi.IntType, mi.FloatType)):
        noun = "an integer" if isinstance(t, mi.IntType) else "a number"
        if t.ge is not None and t.le is not None:
            phrase = f"{noun} from {t.ge} to {t.le}"
        else:
            parts = [p for p in (
                f"at least {t.ge}" if t.ge is not None else None,
                f"greater than {t.gt}" if t.gt is not None else None,
                f"at most {t.le}" if t.le is not None else None,
                f"less than {t.lt}" if t.lt is not None else None,
            ) if p]
            phrase = f"{noun} {' and '.join(parts)}" if parts else noun
        return f"{phrase}, divisible by {t.multiple_of}" if t.multiple_of else phrase
    if isinstance(t, mi.StrType):
        if t.pattern == schema.UUID_PATTERN:
            return "a UUID string"
        if t.min_length is not None and t.max_length is not None:
            return f"a string of {t.min_length} to {t.max_length} characters"
        if t.max_length is not None:
            return f"a string of at most {t.max_length} characters"
        return "a string"
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.ListType):
        bound = f"at most {t.max_length} " if t.max_length is not None else ""
        item = _unannotated(t.item_type)
        if isinstance(item, mi.StructType):
            return f"an array of {bound}objects with " + ", ".join(field.encode_name for field in item.fields)
        if bound:
            return f"an array of {bound}items, each {_describe_one(t.item_type)}"
        return f"an array of {_describe_one(t.item_type)}"
    if isinstance(t, mi.DictType):
        return "an object"
    if isinstance(t, mi.TupleType):
        return f"an array of {len(t.item_types)}: " + ", ".join(map(_describe_one, t.item_types))
    if isinstance(t, mi.StructType):
        return "an object with " + ", ".join(field.encode_name for field in t.fields)
    return "a valid value"


def stepped_range(t: mi.Type) -> mi.IntType | None:
    """The integer member of ``t`` that has a range and a step (width, height), if there is one."""
    for member in non_null(t):
        if isinstance(member, mi.IntType) and member.multiple_of and member.ge is not None and member.le is not None:
            return member
    return None


def nearest_valid(t: mi.IntType, value: int) -> list[int]:
    """The valid values nearest to an out-of-range or off-step ``value``: one at the ends, else two."""
    assert t.ge is not None and t.le is not None and t.multiple_of
    step, low, high = t.multiple_of, t.ge, t.le
    if value < low:
        return [low]
    if value > high:
        return [high]
    lower = value // step * step
    return [size for size in (lower, lower + step) if low <= size <= high]
