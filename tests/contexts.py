"""A TaskContext for tests of the task layer without a server: the catalog is real; the device,
the store, the fetcher and the result registry are stand-ins that fail the test if a pure step
reaches for them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from imagewire.air_registry import Catalog
from imagewire.server.config import Config
from imagewire.tasks.context import PixelBudget, Services, Settings, TaskContext


def settings(**overrides: Any) -> Settings:
    """The task settings a server with ``Config(**overrides)`` gives its handlers: the defaults are Config's."""
    config = Config(**overrides)
    return Settings(**{each.name: getattr(config, each.name) for each in fields(Settings)})


class Unreachable:
    """Stands for a service a test must not use."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        raise AssertionError(f"a pure step used {self._name}.{attribute}")


class PureDevice(Unreachable):
    def __init__(self, unavailable_samplers: Mapping[str, str]) -> None:
        super().__init__("device")
        self.unavailable_samplers = unavailable_samplers


def pure_context(*, catalog: Catalog | None = None, unavailable_samplers: Mapping[str, str] | None = None,
                 owner: str = "test-owner") -> TaskContext:
    services = Services(
        settings=settings(data_dir=Path("unused-data-dir")), catalog=catalog or Catalog.load(),
        store=Unreachable("store"), fetcher=Unreachable("fetcher"),  # type: ignore[arg-type]
        device=PureDevice(unavailable_samplers or {}), results=Unreachable("results"),  # type: ignore[arg-type]
        pixels=PixelBudget(Config().max_waiting_pixels))
    return TaskContext(services, owner)
