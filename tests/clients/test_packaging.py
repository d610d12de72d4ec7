"""The client distribution stays light and cannot drift from the server's wire schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from imagewire_client import requests, schema

from imagewire.server import protocol
from tests.timing import seconds

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
HEAVY_PACKAGES = ("torch", "diffusers", "transformers", "pillow", "orjson", "numpy")


def test_the_client_schema_is_a_byte_identical_copy_of_the_server_schema():
    server_schema = (ROOT / "tasks" / "schema.py").read_bytes()
    client_schema = (CLIENT_DIR / "imagewire_client" / "schema.py").read_bytes()
    assert client_schema == server_schema, "copy tasks/schema.py to clients/python/imagewire_client/schema.py"


def _every_request() -> list:
    data_uri = "data:image/png;base64,iVBORw0KGgo="
    return [
        requests.authentication("test-key"),
        requests.authentication("test-key", "0b6f3c1e-7a43-4d37-9a57-0d4a0a3b8f11"),
        requests.ping(),
        requests.image_upload(data_uri),
        requests.model_search(),
        requests.model_search("tiny", category="checkpoint", architecture="sd15", limit=5, offset=10),
        requests.image_inference(model="imagewire:tiny@1", positive_prompt="a fox", width=128, height=128),
        requests.image_inference(
            model="civitai:101055@128078", positive_prompt="a fox", negative_prompt="blurry", seed_image=data_uri,
            strength=0.5, width=512, height=768, steps=30, cfg_scale=6.5, scheduler="DPM++ 2M Karras", seed=42,
            number_results=4, output_type=["URL", "base64Data"], output_format="WEBP", output_quality=80,
            include_cost=True,
        ),
        requests.image_inference(
            model="imagewire:tiny-sdxl@1", positive_prompt="a (fox:1.2)", width=128, height=128,
            lora=["civitai:58390@62833", ("imagewire:tiny-lora@1", -0.5)], embeddings=[("tiny-embedding", 1.5)],
            vae="imagewire:tiny-vae@1", clip_skip=2, prompt_weighting="sdEmbeds",
            refiner=requests.refiner("imagewire:tiny-sdxl-refiner@1", start_percentage=75),
        ),
        requests.image_inference(
            model="imagewire:tiny-inpaint@1", positive_prompt="a door", seed_image=data_uri, mask_image=data_uri,
            mask_margin=48, check_nsfw=True, safety={"checkInputs": True},
            control_net=[schema.ControlNet(model="imagewire:tiny-controlnet@1", guideImage=data_uri, weight=0.5,
                                           startStep=2, endStepPercentage=80, controlMode="controlnet")],
        ),
        requests.image_inference(model="imagewire:tiny@1", positive_prompt="a door", seed_image=data_uri,
                                 outpaint=schema.Outpaint(top=64, left=128, blur=8)),
        requests.controlnet_preprocess(input_image=data_uri, preprocessor="canny", width=256, low_threshold=50,
                                       high_threshold=150, output_type=["URL", "base64Data"]),
    ]


@pytest.mark.parametrize("task", _every_request(), ids=lambda task: type(task).__name__)
def test_every_request_the_client_builds_decodes_with_the_servers_decoder(task):
    decoded = protocol.decode_frame(requests.encode_tasks([task]), max_tasks=10)
    assert len(decoded) == 1
    assert decoded[0].error is None, decoded[0].error
    # Two copies of one schema: the structs are different classes with the same fields.
    assert type(decoded[0].task).__name__ == type(task).__name__
    assert msgspec.to_builtins(decoded[0].task) == msgspec.to_builtins(task)


def test_requests_leave_unset_fields_off_the_wire():
    frame = json.loads(requests.encode_tasks([requests.image_inference(model="m", positive_prompt="a fox")]))
    assert None not in frame[0].values()
    assert "seedImage" not in frame[0] and "negativePrompt" not in frame[0]
    assert json.loads(requests.encode_tasks([requests.ping()])) == [{"taskType": "ping", "ping": True}]


def test_installing_the_client_pulls_no_model_stack():
    # Offline: the test extra brings the build backend.
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--no-build-isolation",
         "--quiet", "--report", "-", str(CLIENT_DIR)],
        capture_output=True, text=True, check=True, timeout=seconds(120),
    )
    (package,) = json.loads(report.stdout)["install"]
    metadata = package["metadata"]
    assert metadata["name"] == "imagewire-client"
    requirements = metadata["requires_dist"]
    base = [requirement for requirement in requirements if "extra ==" not in requirement]
    assert sorted(base) == ["msgspec>=0.18", "websockets<18,>=14"]
    for requirement in requirements:
        name = requirement.split(";")[0].strip().lower()
        if name.startswith(HEAVY_PACKAGES):
            assert name.startswith("pillow") and 'extra == "pil"' in requirement, requirement


def test_importing_the_client_loads_neither_torch_nor_pillow():
    probe = ("import sys, imagewire_client, imagewire_client.cli; "
             "print(sorted(name for name in ('torch', 'diffusers', 'PIL', 'numpy') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            timeout=seconds(60))
    assert result.stdout.strip() == "[]"


def test_add_ons_are_built_as_the_public_api_spells_them():
    task = requests.image_inference(model="m", positive_prompt="a fox", lora=["a:b@1", ("c:d@2", 0.5)],
                                    embeddings=["e:f@1"], clip_skip=1, prompt_weighting="compel",
                                    refiner=requests.refiner("r:s@1", start_step=20))
    [wire] = json.loads(requests.encode_tasks([task]))
    assert wire["lora"] == [{"model": "a:b@1", "weight": 1.0}, {"model": "c:d@2", "weight": 0.5}]
    assert wire["embeddings"] == [{"model": "e:f@1", "weight": 1.0}]
    assert (wire["clipSkip"], wire["promptWeighting"]) == (1, "compel")
    assert wire["refiner"] == {"model": "r:s@1", "startStep": 20}  # the unset alternative stays off the wire
    plain = json.loads(requests.encode_tasks([requests.image_inference(model="m", positive_prompt="a fox")]))[0]
    assert not {"lora", "embeddings", "vae", "clipSkip", "promptWeighting", "refiner"} & set(plain)
