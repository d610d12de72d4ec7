"""AIR model identifiers: ``source:id@version``, e.g. ``runware:101@1`` or ``civitai:101055@128078``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from imagewire.air_registry.errors import MalformedAIR, shown

# The source is a namespace compared case-insensitively (``Runware:101@1`` is ``runware:101@1``),
# so it is accepted in any case and stored lower-cased; ids and versions are opaque and keep theirs.
_AIR_PATTERN = re.compile(r"(?P<source>[A-Za-z0-9_-]+):(?P<id>[A-Za-z0-9_.-]+)@(?P<version>[A-Za-z0-9_.-]+)")


@dataclass(frozen=True)
class AIR:
    source: str
    id: str
    version: str

    def __str__(self) -> str:
        return f"{self.source}:{self.id}@{self.version}"


def parse_air(text: Any) -> AIR:
    """Parse an AIR id; anything else raises MalformedAIR."""
    match = _AIR_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise MalformedAIR(
            f"must be an AIR id of the form source:id@version, like 'runware:101@1'; received {shown(text)}")
    return AIR(source=match["source"].lower(), id=match["id"], version=match["version"])
