"""A full-size SD 1.5 checkpoint in one file, named by a catalog entry without an architecture, served with
no hub and an empty Hugging Face cache: its configs and tokenizer come from this package."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image
from runware import IImageInference, IModelSearch, Runware

from tests.wire import API_KEY


async def test_a_full_size_sd15_file_runs_offline(start_server, sd15_checkpoint: Path, empty_hf_cache: Path,
                                                  tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"air": "local:mine@1", "name": "My SD 1.5", "aliases": ["mine"],
                                    "source": "single_file", "location": str(sd15_checkpoint)}]))
    server = await start_server(catalog_files=(catalog,))
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        found = await client.modelSearch(payload=IModelSearch(search="local:mine"))
        [image] = await client.imageInference(requestImage=IImageInference(
            model="mine", positivePrompt="a lighthouse at dawn", width=128, height=128, steps=1, seed=3,
            outputType="base64Data", outputFormat="PNG"))
    finally:
        await client.disconnect()
    [model] = found.results
    assert (model.air, model.architecture) == ("local:mine@1", "sd15")  # detected from the file's tensors
    picture = Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data)))
    assert picture.size == (128, 128)
    # Nothing was fetched: the Hugging Face cache is as empty as it started.
    assert list(empty_hf_cache.iterdir()) == []
