"""The garbage collector and a long-lived server: what the process imported is frozen out of its passes, the
models it loads are not (an evicted model must still be collected)."""

from __future__ import annotations

import gc

import torch

from imagewire.server.app import ImagewireServer
from imagewire.server.config import Config
from tests.timing import seconds
from tests.wire import API_KEY


async def test_a_server_process_freezes_what_it_imported_but_not_the_models_it_loads(data_dir):
    server = ImagewireServer(Config(host="127.0.0.1", port=0, data_dir=data_dir, api_keys=(API_KEY,)),
                             freeze_at_start=True)
    try:
        await server.start()
        # torch's and diffusers' modules, functions and classes: tens of thousands of objects at the least.
        assert gc.get_freeze_count() > 50_000
        walked = gc.get_objects()  # what the collector still walks: never the frozen ones
        assert any(isinstance(thing, torch.nn.Module) for thing in walked), "the default model was frozen too"
    finally:
        await server.stop(grace=seconds(5))
        gc.unfreeze()


async def test_a_server_in_a_shared_process_freezes_nothing(start_server):
    before = gc.get_freeze_count()
    await start_server()
    assert gc.get_freeze_count() == before
