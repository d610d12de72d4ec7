"""Bytes ⇄ typed tasks and answer frames. Pure: no I/O, no torch.

A frame from a client is a JSON array of task objects. Each task is decoded on its own,
so one bad task becomes one error item and its neighbours still run:

1. the frame is parsed as ``list[msgspec.Raw]`` (not JSON or not an array → ``FrameError``);
2. each element is parsed into a dict, its ``taskType`` and ``taskUUID`` read for scoping;
3. ``null`` values are dropped (they count as absent), and so are empty arrays and objects
   given for optional parameters (``"lora": []``: clients send them for "none"); keys checked
   against the task's fields (``unsupportedParameter`` for what the public API defines and we
   don't run yet, ``unknownParameter`` for anything else);
4. ``msgspec.convert`` checks types and value limits; its errors are rewritten into
   sentences naming the parameter (``lora[1].weight`` inside arrays and objects), the allowed
   values and the value received.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec
import msgspec.inspect as mi

from imagewire.tasks import schema
from imagewire.tasks.describe import (
    describe_type,
    extra,
    literal_values,
    nearest_valid,
    non_null,
    stepped_range,
    wire_type,
)
from imagewire.tasks.errors import (
    InvalidParameter,
    MissingParameter,
    TaskError,
    UnknownParameter,
    UnsupportedParameter,
    UnsupportedTaskType,
    describe_value,
    short_name,
)
from imagewire.tasks.supported import SUPPORTED

# The two tasks the transport answers itself, then every task type of the task layer.
TASK_TYPES: dict[str, type[schema.Task]] = {
    "authentication": schema.Authentication,
    "ping": schema.Ping,
    **{name: task_type.struct for name, task_type in SUPPORTED.items()},
}

_frame_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_object_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class FrameError(TaskError):
    """The frame as a whole is unreadable; answered with one error item without taskUUID."""

    code = "invalidMessage"


@dataclass(frozen=True)
class Decoded:
    """One element of a frame: a typed task, or the error that replaces it."""

    task_type: str | None
    task_uuid: str | None
    task: schema.Task | None = None
    error: TaskError | None = None


# A \u escape in the UTF-16 surrogate range: where msgspec refuses a frame over one of these, the
# frame may hold half a surrogate pair, JSON text that names no character (see _with_lone_surrogates).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_frame(frame: str | bytes, *, max_tasks: int) -> list[Decoded]:
    elements: list[Any]
    surrogates = False
    try:
        # A str is read in place: msgspec takes its UTF-8 form, without a copy for ASCII text.
        elements = _frame_decoder.decode(frame)
    except RecursionError as exc:
        raise _too_deep() from exc
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        # (A str with a lone surrogate in it has no UTF-8 form: it is read as the bytes it would be.)
        text = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
        elements = _with_lone_surrogates(text, exc)
        surrogates = True
    if len(elements) > max_tasks:
        raise FrameError(
            f"A message may carry at most {max_tasks} tasks; this one carries {len(elements)}. "
            "Send the rest in further messages.",
        )
    return [decode_task(element, surrogates=surrogates) for element in elements]


def _with_lone_surrogates(text: bytes, error: msgspec.DecodeError | UnicodeEncodeError) -> list[Any]:
    """The frame's elements, where msgspec refused it for half a surrogate pair (``"\\ud800"`` alone).

    The standard library's parser reads such an escape as a lone surrogate, so the frame's other tasks
    still run and the task that carries it is answered with the field it is in. Only frames msgspec
    refused come here, so a frame that is fine costs nothing more.
    """
    if _SURROGATE_ESCAPE.search(text) is None:
        raise _unreadable(error)
    try:
        elements = json.loads(text, parse_constant=_not_json)
    except RecursionError as exc:
        raise _too_deep() from exc
    except ValueError as exc:
        raise _unreadable(error) from exc
    if not isinstance(elements, list):
        raise _unreadable(error)
    return elements


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _too_deep() -> FrameError:
    return FrameError("The message is nested too deeply to be a task array.")


def _unreadable(error: msgspec.DecodeError | UnicodeEncodeError) -> FrameError:
    return FrameError(
        "Each message must be a JSON array of task objects, e.g. "
        '[{"taskType":"ping","ping":true}]; this one could not be read as one '
        f"({_first_sentence(str(error))}).",
    )


def decode_task(raw: msgspec.Raw | bytes | Any, *, surrogates: bool = False) -> Decoded:
    """One element of a frame: JSON text, or (``surrogates``) what the standard library parsed it into."""
    obj = raw
    if isinstance(raw, (msgspec.Raw, bytes)):
        try:
            obj = _object_decoder.decode(raw)
        except RecursionError:
            return Decoded(None, None, error=InvalidParameter("A task is nested too deeply to be read."))
        except msgspec.DecodeError as exc:  # pragma: no cover - the frame decoder already checked the JSON
            return Decoded(None, None, error=InvalidParameter(f"A task is not valid JSON: {exc}"))
    if not isinstance(obj, dict):
        return Decoded(None, None, error=InvalidParameter(
            f"Each task must be a JSON object; received {type(obj).__name__} {describe_value(obj)}."))
    task_type = obj.get("taskType")
    raw_uuid = obj.get("taskUUID")
    task_uuid = raw_uuid if isinstance(raw_uuid, str) else None
    if not isinstance(task_type, str):
        return Decoded(None, task_uuid, error=MissingParameter(
            "Every task needs a taskType string, one of " + ", ".join(TASK_TYPES) + ".",
            parameter="taskType", type="string", allowed_values=list(TASK_TYPES)))
    if surrogates:
        where = _lone_surrogate_field(obj)
        if where is not None:
            return Decoded(task_type, task_uuid, error=InvalidParameter(
                f"{where} holds a \\u escape of half a UTF-16 surrogate pair (such as \\ud800 alone), which is not "
                "a character; send it as valid Unicode text.", parameter=where, type="string"))
    struct_type = TASK_TYPES.get(task_type)
    if struct_type is None:
        return Decoded(task_type, task_uuid, error=UnsupportedTaskType(
            f"taskType {describe_value(task_type)} is not supported by this server; supported: "
            + ", ".join(TASK_TYPES) + ".",
            parameter="taskType", type="string", allowed_values=list(TASK_TYPES)))
    try:
        task = convert_task(obj, struct_type)
    except TaskError as error:
        # Without its traceback: its frames hold this task's text and objects (megabytes, in a large
        # message) for as long as the error waits to be answered.
        return Decoded(task_type, task_uuid, error=error.with_traceback(None))
    return Decoded(task_type, task_uuid, task=task)


def _lone_surrogate_field(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) that holds a lone surrogate, or None."""
    if isinstance(value, str):
        return path or "task" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, member in value.items():
            name = f"{path}.{key}" if path else str(key)
            if _SURROGATE.search(key):
                return short_name(_SURROGATE.sub("\ufffd", name))  # an error item must be valid text
            found = _lone_surrogate_field(member, name)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, member in enumerate(value):
            found = _lone_surrogate_field(member, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def convert_task(obj: dict[str, Any], struct_type: type[schema.Task]) -> schema.Task:
    task_type = obj["taskType"]
    fields = _field_names(struct_type)
    unsupported = schema.UNSUPPORTED_PARAMETERS.get(task_type, frozenset())
    optional = _optional_fields(struct_type) | unsupported
    cleaned = {key: _without_nulls(value) for key, value in obj.items()}
    present = {key: value for key, value in cleaned.items() if not _absent(key, value, optional)}
    extra = [key for key in present if key not in fields and key != "taskType"]
    not_yet = [short_name(key) for key in extra if key in unsupported]
    if not_yet:
        raise UnsupportedParameter(
            f"{', '.join(not_yet)} {'is' if len(not_yet) == 1 else 'are'} not supported by this server "
            f"for {task_type} yet; remove {'it' if len(not_yet) == 1 else 'them'} from the request.",
            parameter=not_yet[0])
    if extra:
        raise UnknownParameter(
            f"{short_name(extra[0])} is not a parameter of {task_type}. Known parameters: "
            + ", ".join(sorted(fields)) + ".",
            parameter=short_name(extra[0]), allowed_values=sorted(fields))
    try:
        return msgspec.convert(present, struct_type)
    except msgspec.ValidationError as exc:
        nested = _nested_validation_error(exc, present, struct_type)
        raise (nested or _translate_validation_error(exc, present, struct_type)) from exc


def _without_nulls(value: Any) -> Any:
    """An object, or an array of objects, without its ``null`` members: one level down, null means
    absent too (``{"model": "x", "weight": null}``). Deeper values are the schema's business."""
    if isinstance(value, dict):
        return {key: member for key, member in value.items() if member is not None}
    if isinstance(value, list):
        return [_without_nulls(item) if isinstance(item, dict) else item for item in value]
    return value


def _absent(key: str, value: Any, optional: frozenset[str]) -> bool:
    """``null`` is absent anywhere; ``[]`` and ``{}`` are absent for a parameter that may be left
    out (a key the task does not know keeps its ``unknownParameter``, whatever its value)."""
    return value is None or (key in optional and (value == [] or value == {}))


_PATH = re.compile(r"at `\$\.(?P<field>[A-Za-z0-9_]+)(?P<rest>[^`]*)`")
_MISSING = re.compile(r"missing required field `(?P<field>[A-Za-z0-9_]+)`")


def _translate_validation_error(
    exc: msgspec.ValidationError, present: dict[str, Any], struct_type: type[schema.Task]
) -> TaskError:
    text = str(exc)
    missing = _MISSING.search(text)
    if missing:
        name = missing.group("field")
        info = _field_info(struct_type).get(name)
        return MissingParameter(
            f"{name} is required: expected {describe_type(info.type) if info else 'a value'}.",
            parameter=name, type=wire_type(info.type) if info else None)
    at = _PATH.search(text)
    if not at:
        return InvalidParameter(f"The task could not be read: {_first_sentence(text)}.")
    name = at.group("field")
    info = _field_info(struct_type).get(name)
    received = present.get(name)
    if name == "taskUUID":
        return InvalidParameter(
            f"taskUUID must be a UUID string like '4a8c1e2b-...'; received {describe_value(received)}.",
            parameter=name, type="string")
    if info is not None and isinstance(received, int) and not isinstance(received, bool):
        stepped = stepped_range(info.type)
        if stepped is not None:
            nearest = nearest_valid(stepped, received)
            return InvalidParameter(
                f"Invalid {name}: must be from {stepped.ge} to {stepped.le} and divisible by {stepped.multiple_of}; "
                f"received {received}. Nearest valid value{'s' if len(nearest) > 1 else ''}: "
                f"{' or '.join(map(str, nearest))}.",
                parameter=name, type="integer", allowed_values=nearest, code=extra(info.type).get("code"))
    expected = describe_type(info.type) if info else "another value"
    allowed = literal_values(info.type) if info else None
    return InvalidParameter(
        f"Invalid {name}: expected {expected}; received {describe_value(received)}.",
        parameter=name, type=wire_type(info.type) if info else None, allowed_values=allowed)


# ``$.controlNet[0].weight`` → the parts ``controlNet``, 0, ``weight``.
_NESTED_PATH = re.compile(r"at `\$(?P<path>(?:\.[A-Za-z0-9_]+|\[\d+\])+)`")
_PATH_PART = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]")
_UNKNOWN_FIELD = re.compile(r"unknown field `(?P<field>[^`]+)`")


def _nested_validation_error(
    exc: msgspec.ValidationError, present: dict[str, Any], struct_type: type[schema.Task]
) -> TaskError | None:
    """The error for a value inside an object or array (``controlNet[0].weight``, ``outpaint.top``,
    ``settings.rgba[3]``), named by its whole path; None for a top-level field, which
    ``_translate_validation_error`` describes."""
    text = str(exc)
    at = _NESTED_PATH.search(text)
    if at is None:
        return None
    parts: list[str | int] = [name if name else int(index) for name, index in _PATH_PART.findall(at.group("path"))]
    unknown, missing = _UNKNOWN_FIELD.search(text), _MISSING.search(text)
    if unknown or missing:  # about a key of the object at the path
        parts.append((unknown or missing).group("field"))  # type: ignore[union-attr]
    if len(parts) < 2:
        return None
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    container = path.rsplit(".", 1)[0] if isinstance(parts[-1], str) else path
    leaf, received = _walk(struct_type, present, parts)
    if unknown:
        known = sorted(_struct_fields(_walk(struct_type, present, parts[:-1])[0]))
        return UnknownParameter(
            f"{path} is not a parameter of {container}. Known parameters: {', '.join(known)}.",
            parameter=path, allowed_values=known)
    if missing:
        expected = describe_type(leaf) if leaf is not None else "a value"
        return MissingParameter(f"{path} is required: expected {expected}.", parameter=path,
                                type=wire_type(leaf) if leaf is not None else None)
    if leaf is None:
        return InvalidParameter(f"Invalid {path}: {_first_sentence(text)}.", parameter=path)
    if isinstance(received, int) and not isinstance(received, bool):
        stepped = stepped_range(leaf)
        if stepped is not None:
            nearest = nearest_valid(stepped, received)
            return InvalidParameter(
                f"Invalid {path}: must be from {stepped.ge} to {stepped.le} and divisible by "
                f"{stepped.multiple_of}; received {received}. Nearest valid value{'s' if len(nearest) > 1 else ''}: "
                f"{' or '.join(map(str, nearest))}.", parameter=path, type="integer", allowed_values=nearest)
    return InvalidParameter(
        f"Invalid {path}: expected {describe_type(leaf)}; received {describe_value(received)}.",
        parameter=path, type=wire_type(leaf), allowed_values=literal_values(leaf))


def _walk(struct_type: type[schema.Task], present: dict[str, Any], parts: list[str | int]) -> tuple[Any, Any]:
    """The schema type and the client's value at ``parts`` (either None where the path leaves them)."""
    node: Any = mi.type_info(struct_type)
    value: Any = present
    for part in parts:
        node = _step(node, part)
        if isinstance(part, int):
            value = value[part] if isinstance(value, list) and part < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    return node, value


def _step(node: Any, part: str | int) -> Any:
    if node is None:
        return None
    for member in non_null(node) if not isinstance(node, mi.StructType) else [node]:
        if isinstance(part, int) and isinstance(member, mi.ListType):
            return member.item_type
        if isinstance(part, int) and isinstance(member, mi.TupleType):
            return member.item_types[part] if part < len(member.item_types) else None
        if isinstance(part, str) and isinstance(member, mi.StructType):
            return next((field.type for field in member.fields if field.encode_name == part), None)
        if isinstance(part, str) and isinstance(member, mi.DictType):
            return member.value_type
    return None


def _struct_fields(node: Any) -> list[str]:
    for member in non_null(node) if node is not None and not isinstance(node, mi.StructType) else [node]:
        if isinstance(member, mi.StructType):
            return [field.encode_name for field in member.fields]
    return []


@cache
def _field_info(struct_type: type[schema.Task]) -> dict[str, mi.Field]:
    info = mi.type_info(struct_type)
    assert isinstance(info, mi.StructType)
    return {field.encode_name: field for field in info.fields}


@cache
def _optional_fields(struct_type: type[schema.Task]) -> frozenset[str]:
    return frozenset(name for name, field in _field_info(struct_type).items() if not field.required)


@cache
def _field_names(struct_type: type[schema.Task]) -> frozenset[str]:
    return frozenset(_field_info(struct_type))


def _first_sentence(text: str) -> str:
    return text.split("\n", 1)[0][:200]


# ---------------------------------------------------------------- outbound


def encode_frame(*, data: list[Any] | None = None, errors: list[dict[str, Any]] | None = None) -> bytes:
    """One server frame: ``{"data": [...]}`` and/or ``{"errors": [...]}``."""
    frame: dict[str, Any] = {}
    if data:
        frame["data"] = data
    if errors:
        frame["errors"] = errors
    return _encoder.encode(frame)


def encode_item(item: Any) -> bytes:
    """One answer item as JSON, to be placed in a frame as ``msgspec.Raw``."""
    return _encoder.encode(item)


def error_frame(error: TaskError, task_type: str | None, task_uuid: str | None) -> bytes:
    return encode_frame(errors=[error.to_item(task_type, task_uuid)])
