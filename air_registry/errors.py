"""What can go wrong naming and loading models, in the registry's own terms.

    RegistryError           a client's request names something the registry cannot give
    ├── MalformedAIR        not an AIR id (nor an alias)
    ├── UnknownModel        a well-formed AIR id that the catalog does not hold
    ├── WeightsMissing      a catalog model whose weights are not on this server (or do not load)
    ├── UnknownSampler      a scheduler name that means nothing here
    ├── SamplerUnusable     a known scheduler this server or this model cannot run
    └── AddOnUnusable       a LoRA, embedding or VAE whose weights do not load into the model
    CatalogError            a catalog file is malformed: the operator's mistake, found at start-up

The registry knows nothing of the wire. Each error is phrased to follow the name of the request
field it is about (``describe("model")``); the task layer turns it into an error item.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of a client's value inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RegistryError(Exception):
    def __init__(self, problem: str, *, allowed_values: list[str] | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.allowed_values = allowed_values

    def describe(self, name: str) -> str:
        """The sentence for a client, about the request field called ``name``."""
        return f"{name} {self.problem}"


class MalformedAIR(RegistryError):
    pass


class UnknownModel(RegistryError):
    pass


class WeightsMissing(RegistryError):
    """The message is whole: it names the model and what to do, not the request field."""

    def describe(self, name: str) -> str:
        return self.problem


class UnknownSampler(RegistryError):
    pass


class SamplerUnusable(RegistryError):
    pass


class AddOnUnusable(RegistryError):
    """The message is whole; ``air`` names the add-on, so the task layer can name the request field."""

    def __init__(self, problem: str, *, air: str) -> None:
        super().__init__(problem)
        self.air = air

    def describe(self, name: str) -> str:
        return f"{name}: {self.problem}"


class CatalogError(ValueError):
    """A catalog file is malformed: an operator's mistake, reported at start-up."""
