"""The asynchronous client: one WebSocket, many calls in flight, reconnection with session resume.

One reader task owns the socket's inbound side and completes calls by ``taskUUID``, so
any number of calls can run concurrently on one connection. If the socket drops, the
reader reconnects with backoff and authenticates with the previous
``connectionSessionUUID``; the server then delivers the results it kept meanwhile.
Every call is bounded by its own timeout, so nothing waits forever on a lost answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Unpack

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from imagewire_client import requests, schema
from imagewire_client.calls import CallTable, PendingCall, inference_progress
from imagewire_client.edits import ControlNet, Outpaint
from imagewire_client.errors import (
    CLIENT_CLOSED,
    CONNECTION_FAILED,
    CONNECTION_LOST,
    TIMEOUT,
    ImagewireError,
)
from imagewire_client.images import ImageSource, image_field, is_remote_reference
from imagewire_client.results import (
    UPLOAD_PHASES,
    GuideImage,
    ImageResult,
    MaskImage,
    ModelDownloadResult,
    ModelInfo,
    TextResult,
    UploadedImage,
    download_progress,
    downloaded_model,
    guide_image,
    image_result,
    mask_image,
    model_infos,
    text_result,
    upload_phase,
    uploaded_image,
)

log = logging.getLogger("imagewire_client")

DEFAULT_URL = "ws://127.0.0.1:8080/v1"
PING_INTERVAL = 20.0
# Silence longer than this means the server or the path to it is gone, even if TCP has not noticed.
SILENCE_TIMEOUT = 30.0
RECONNECT_ATTEMPTS = 8
RECONNECT_BASE_DELAY = 0.25
RECONNECT_MAX_DELAY = 5.0
# Results carry whole images as base64; the websockets default of 1 MiB would cut them off.
MAX_FRAME_BYTES = 512 * 1024 * 1024
# A model can be tens of gigabytes: a download is given hours, not the minutes other calls get.
DOWNLOAD_TIMEOUT = 6 * 3600.0
# The longest ``search`` text modelSearch takes.
MAX_SEARCH_LENGTH = 200

_envelope_decoder = msgspec.json.Decoder(schema.Envelope)
# Answers to these never depend on anything that can change; a refused key stays refused.
_FATAL_AUTH_CODES = frozenset({"invalidApiKey", "missingApiKey"})


async def _image_field(source: ImageSource, parameter: str) -> str:
    # Reading a file, encoding a PIL image and base64 can take a while for big images: keep the loop free.
    if isinstance(source, str) and is_remote_reference(source):
        return source
    return await asyncio.to_thread(image_field, source, parameter)


class Client:
    """Asynchronous imagewire client.

    Use it as ``async with Client(url, api_key) as client:``; entering connects and
    authenticates (an unknown key raises ``ImagewireError`` with code ``invalidApiKey``).
    Methods may also be called without entering: the first call connects.

    ``ping_interval`` paces the keep-alive pings; ``reconnect_attempts`` bounds how often a
    dropped connection is retried (with exponential backoff) before calls fail with code
    ``connectionLost``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        ping_interval: float = PING_INTERVAL,
        silence_timeout: float = SILENCE_TIMEOUT,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
        connect_timeout: float = 10.0,
        max_frame_bytes: int | None = MAX_FRAME_BYTES,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.ping_interval = ping_interval
        self.silence_timeout = silence_timeout
        self.reconnect_attempts = reconnect_attempts
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self._session_uuid: str | None = None
        self._websocket: ClientConnection | None = None
        self._calls = CallTable()
        self._cancels: dict[str, list[PendingCall]] = {}  # cancelTask calls, by the taskUUID they name
        self._connected = asyncio.Event()  # set while a live, authenticated socket is in ``_websocket``
        self._connect_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        self._closed = False
        self._failure: ImagewireError | None = None  # set when reconnecting gave up

    # ------------------------------------------------------------------ lifecycle

    @property
    def session_uuid(self) -> str | None:
        """The server's ``connectionSessionUUID`` for this client, once authenticated."""
        return self._session_uuid

    @property
    def connected(self) -> bool:
        """True while an authenticated socket is up (False during a reconnection and after close)."""
        return self._connected.is_set() and not self._closed and self._failure is None

    async def connect(self) -> Client:
        """Connect and authenticate; does nothing if already connected."""
        async with self._connect_lock:
            self._raise_if_unusable()
            if self._reader is None:
                self._websocket = await self._open()
                self._connected.set()
                self._reader = asyncio.create_task(self._read_forever(), name="imagewire-reader")
                self._keeper = asyncio.create_task(self._keep_alive(), name="imagewire-keepalive")
        return self

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with code ``clientClosed``. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._connected.set()  # wake senders waiting for a connection, so they see the client is closed
        for task in (self._keeper, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._websocket is not None:
            await self._websocket.close()
        self._calls.fail_all(ImagewireError(CLIENT_CLOSED, "The client was closed before the server answered."))

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise ImagewireError(CLIENT_CLOSED, "The client is closed; create a new one.")
        if self._failure is not None:
            raise self._failure

    # ------------------------------------------------------------------ the public calls

    async def upload(self, image: ImageSource, *, timeout: float = 120.0) -> str:
        """Store an image on the server and return its image UUID.

        ``image`` is a file path (``str`` or ``Path``), bytes, a PIL image, a data URI or an
        http(s) URL that the server fetches. The UUID can be passed wherever a task takes an image.
        """
        return (await self.upload_image(image, timeout=timeout)).uuid

    async def upload_image(self, image: ImageSource, *, timeout: float = 120.0) -> UploadedImage:
        """Like ``upload`` but returns both the image UUID and the URL the server serves it at."""
        task = requests.image_upload(await _image_field(image, "image"))
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout)
        return uploaded_image(items[0])

    async def image_inference(
        self,
        *,
        model: str,
        positive_prompt: str,
        negative_prompt: str | None = None,
        seed_image: ImageSource | None = None,
        strength: float | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        number_results: int = 1,
        output_type: str | list[str] = "URL",
        output_format: str = "PNG",
        output_quality: int | None = None,
        include_cost: bool = False,
        lora: Sequence[requests.AddOnSpec] = (),
        embeddings: Sequence[requests.AddOnSpec] = (),
        vae: str | None = None,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        refiner: str | schema.Refiner | None = None,
        refiner_start_step: int | None = None,
        refiner_start_percentage: float | None = None,
        mask_image: ImageSource | None = None,
        mask_margin: int | None = None,
        outpaint: Outpaint | None = None,
        control_net: Sequence[ControlNet] = (),
        check_nsfw: bool = False,
        check_inputs: bool = False,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        preview: bool = False,
        task_uuid: str | None = None,
        timeout: float = 300.0,
    ) -> list[ImageResult]:
        """Generate images; returns one ``ImageResult`` per image, sorted by seed.

        Without ``seed_image`` this is text-to-image at ``width`` x ``height`` (128–2048, multiples
        of 64); either one left out is the model's default, which the client asks the server for
        (``model_info``). With ``seed_image`` (a path, bytes, a PIL image, an image UUID, a data URI
        or an http(s) URL) it is image-to-image, at the seed image's size unless both are given;
        ``strength`` (0–1] sets how far the result may move from it. ``output_type`` is ``"URL"``, ``"base64Data"`` or
        ``"dataURI"`` (or a list of them); with either of the last two, ``ImageResult.image_bytes``
        holds the encoded image. Server-side validation errors raise ``ImagewireError`` naming
        the parameter; no answer within ``timeout`` seconds raises one with code ``timeout``.

        What to add to the model: ``lora`` and ``embeddings`` (AIRs, or ``(AIR, weight)`` pairs with weights
        from -4 to 4), ``vae`` (an AIR), ``clip_skip`` (0-2), ``prompt_weighting`` (``"compel"`` or
        ``"sdEmbeds"``: the syntax of the prompts), and for SDXL models a ``refiner`` (an AIR) that takes over
        at ``refiner_start_step`` or ``refiner_start_percentage`` of the steps.

        Editing: ``mask_image`` (white = repaint; any image form) inpaints the seed image, with
        ``mask_margin`` (32–128) repainting a crop around the mask at full size; ``outpaint``
        (``Outpaint(top=..., right=..., bottom=..., left=..., blur=...)``) extends it; ``control_net``
        takes ``ControlNet`` settings whose ``guide_image`` is any image form. ``check_nsfw`` has each
        result checked (``ImageResult.nsfw_content``; flagged results come back black) and
        ``check_inputs`` the input images.

        ``on_progress`` is called with each progress item of the task (``progress`` in percent,
        ``resultIndex``, ``step`` and ``steps``, or ``queuePosition`` while it waits), and with a small
        ``preview`` data URI about once a second when ``preview`` is true. Pass your own ``task_uuid``
        to be able to ``cancel`` the task from elsewhere.
        """
        if seed_image is None and (width is None or height is None):
            width, height = await self._default_size(model, width, height, timeout=timeout)
        controls = [
            schema.ControlNet(model=control.model, guideImage=await _image_field(
                control.guide_image, f"controlNet[{index}].guideImage"), weight=control.weight,
                startStep=control.start_step, endStep=control.end_step,
                startStepPercentage=control.start_step_percentage, endStepPercentage=control.end_step_percentage,
                controlMode=control.control_mode)  # type: ignore[arg-type]  # checked by the server
            for index, control in enumerate(control_net)
        ]
        task = requests.image_inference(
            model=model, positive_prompt=positive_prompt, negative_prompt=negative_prompt,
            seed_image=None if seed_image is None else await _image_field(seed_image, "seedImage"),
            strength=strength, width=width, height=height, steps=steps, cfg_scale=cfg_scale, scheduler=scheduler,
            seed=seed, number_results=number_results, output_type=output_type, output_format=output_format,
            output_quality=output_quality, include_cost=include_cost, lora=lora, embeddings=embeddings, vae=vae,
            clip_skip=clip_skip, prompt_weighting=prompt_weighting,
            refiner=None if refiner is None else requests.refiner(
                refiner, start_step=refiner_start_step, start_percentage=refiner_start_percentage),
            include_progress=on_progress is not None,
            include_preview=preview and on_progress is not None, task_uuid=task_uuid,
            mask_image=None if mask_image is None else await _image_field(mask_image, "maskImage"),
            mask_margin=mask_margin, control_net=controls, check_nsfw=check_nsfw,
            outpaint=None if outpaint is None else schema.Outpaint(
                top=outpaint.top, right=outpaint.right, bottom=outpaint.bottom, left=outpaint.left,
                blur=outpaint.blur),
            safety={"checkInputs": True} if check_inputs else None,
        )
        items = await self._call(task, task.taskUUID, expected=number_results, timeout=timeout,
                                 counted_key="imageUUID", on_progress=on_progress)
        results = [image_result(item) for item in items]
        return sorted(results, key=lambda result: (result.seed is None, result.seed or 0))

    async def controlnet_preprocess(
        self,
        image: ImageSource,
        *,
        preprocessor: str = "canny",
        width: int | None = None,
        height: int | None = None,
        low_threshold: int | None = None,
        high_threshold: int | None = None,
        output_format: str = "PNG",
        timeout: float = 120.0,
    ) -> GuideImage:
        """A ControlNet guide image made from ``image`` (``canny``, ``tile``, ``shuffle``); its ``uuid`` can be a
        ``ControlNet``'s ``guide_image``, and ``image_bytes`` holds it. ``width``/``height`` only scale down."""
        task = requests.controlnet_preprocess(
            input_image=await _image_field(image, "inputImage"), preprocessor=preprocessor, width=width,
            height=height, low_threshold=low_threshold, high_threshold=high_threshold,
            output_type=["URL", "base64Data"], output_format=output_format)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout)
        return guide_image(items[0])

    async def cancel(self, task_uuid: str, *, timeout: float = 60.0) -> bool:
        """Stop a task this API key sent: True when it was stopped (its call then raises ``ImagewireError``
        with code ``taskCancelled``), False when it had already ended. An unknown task raises code
        ``taskNotFound``."""
        task = requests.cancel_task(task_uuid)
        call = PendingCall(task_uuid=task_uuid, task_type="cancelTask", expected=1)
        # The answer carries the cancelled task's UUID, which that task's own call is waiting on too.
        self._cancels.setdefault(task_uuid, []).append(call)
        try:
            async with asyncio.timeout(timeout):
                await self.connect()
                await self._send(requests.encode_tasks([task]), call)
                items = await call.future
        except TimeoutError:
            raise ImagewireError(TIMEOUT, f"No answer to cancelTask for {task_uuid} within {timeout:g} s.",
                                 task_uuid=task_uuid, task_type="cancelTask") from None
        finally:
            self._cancels[task_uuid].remove(call)
            if not self._cancels[task_uuid]:
                del self._cancels[task_uuid]
        return bool(items[0].get("cancelled"))

    async def upscale(
        self,
        image: ImageSource,
        *,
        factor: float = 2,
        model: str | None = None,
        output_type: str | list[str] = "URL",
        output_format: str = "PNG",
        output_quality: int | None = None,
        include_cost: bool = False,
        timeout: float = 300.0,
    ) -> ImageResult:
        """Enlarge an image by ``factor`` (2–4) with a super-resolution model (the server's default upscaler
        unless ``model`` names one). ``image`` takes the same forms as ``seed_image``; the result's
        ``input_image_uuid`` names the input as the server keeps it."""
        task = requests.image_upscale(
            image=await _image_field(image, "inputImage"), upscale_factor=factor, model=model,
            output_type=output_type, output_format=output_format, output_quality=output_quality,
            include_cost=include_cost)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout, counted_key="imageUUID")
        return image_result(items[0])

    async def remove_background(
        self,
        image: ImageSource,
        *,
        model: str | None = None,
        output_type: str | list[str] = "URL",
        output_format: str = "PNG",
        output_quality: int | None = None,
        settings: dict[str, Any] | None = None,
        include_cost: bool = False,
        timeout: float = 300.0,
    ) -> ImageResult:
        """Cut the subject out of an image: PNG and WEBP results keep an alpha channel. ``settings`` takes
        the public API's fields: ``rgba`` ([r, g, b, alpha 0–1] of the background), ``returnOnlyMask``,
        ``postProcessMask``, ``alphaMatting`` and its thresholds."""
        task = requests.background_removal(
            image=await _image_field(image, "inputImage"), model=model, output_type=output_type,
            output_format=output_format, output_quality=output_quality, settings=settings, include_cost=include_cost)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout, counted_key="imageUUID")
        return image_result(items[0])

    async def mask(
        self,
        image: ImageSource,
        *,
        model: str = "runware:35@1",
        confidence: float | None = None,
        max_detections: int | None = None,
        mask_padding: int | None = None,
        mask_blur: int | None = None,
        output_format: str = "PNG",
        include_cost: bool = False,
        timeout: float = 300.0,
    ) -> MaskImage:
        """A mask of the faces (``runware:35@1``), hands (``@3``) or people (``@4``) in ``image``, white inside
        each detection grown by ``mask_padding`` and fading out over ``mask_blur`` pixels; ``detections`` has
        their boxes. Its ``uuid`` can be an inpainting request's ``mask_image``."""
        task = requests.image_masking(
            input_image=await _image_field(image, "inputImage"), model=model, confidence=confidence,
            max_detections=max_detections, mask_padding=mask_padding, mask_blur=mask_blur,
            output_type=["URL", "base64Data"], output_format=output_format, include_cost=include_cost)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout, counted_key="maskImageUUID")
        return mask_image(items[0])

    async def caption(self, image: ImageSource, *, model: str | None = None, prompt: str | None = None,
                      include_cost: bool = False, timeout: float = 300.0) -> TextResult:
        """Describe an image in words; ``prompt`` is how the caption begins."""
        task = requests.image_caption(image=await _image_field(image, "inputImage"), model=model, prompt=prompt,
                                      include_cost=include_cost)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout, counted_key="text")
        return text_result(items[0])

    async def enhance_prompt(self, prompt: str, *, versions: int = 1, max_length: int = 380, model: str | None = None,
                             seed: int | None = None, include_cost: bool = False,
                             timeout: float = 300.0) -> list[TextResult]:
        """``versions`` (1–5) richer versions of ``prompt``, each at most ``max_length`` (12–400) tokens;
        the same request (or ``seed``) gives the same versions."""
        task = requests.prompt_enhance(prompt=prompt, max_length=max_length, versions=versions, model=model,
                                       seed=seed, include_cost=include_cost)
        items = await self._call(task, task.taskUUID, expected=versions, timeout=timeout, counted_key="text")
        return [text_result(item) for item in items]

    async def models(
        self,
        search: str | None = None,
        *,
        category: str | None = None,
        architecture: str | None = None,
        limit: int = 100,
        offset: int = 0,
        timeout: float = 60.0,
    ) -> list[ModelInfo]:
        """The models the server offers, optionally filtered by a search text, category or architecture."""
        task = requests.model_search(search, category=category, architecture=architecture, limit=limit,
                                     offset=offset)
        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout)
        return model_infos(items[0])

    async def upload_model(self, download_url: str, *, timeout: float = 3600.0,
                           **fields: Unpack[requests.ModelUploadFields]) -> list[str]:
        """Add a model to the server's catalog from ``download_url`` (modelUpload; the server needs
        --allow-downloads); the phases it answered, ``validated`` to ``ready``. Usable by ``air`` once it returns.
        ``fields``: ``requests.ModelUploadFields`` (``air``, ``category``, ``architecture``, ``name``, ``version``,
        ``unique_identifier``, and where they apply ``type``, ``tags``, ``conditioning``, ``trigger_word``, the
        ``default_*`` settings). ``unique_identifier``: the file's SHA-256 makes the server check it."""
        task = requests.model_upload(download_url, **fields)
        items = await self._call(task, task.taskUUID, expected=UPLOAD_PHASES, timeout=timeout)
        return [upload_phase(item) for item in items]

    async def download_model(self, model: str, *, on_progress: Callable[[int, int], None] | None = None,
                             timeout: float = DOWNLOAD_TIMEOUT) -> ModelDownloadResult:
        """Have the server fetch a catalog model from the Hugging Face hub into its cache (modelDownload; the
        server needs --allow-downloads): ``models`` marks the ones it can fetch ``downloadable``. Returns the
        ``ready`` answer (``air``, ``bytesTotal``) once the whole model is there; ``on_progress(bytes_done,
        bytes_total)`` hears each progress answer before it. Leaving early (a timeout, a cancelled call) stops
        following, not the server's download: a later call for the same model follows the same download."""
        task = requests.model_download(model)

        def progress(item: dict[str, Any]) -> None:
            if on_progress is not None:
                done, total = download_progress(item)
                on_progress(done, total)

        items = await self._call(task, task.taskUUID, expected=1, timeout=timeout, on_progress=progress,
                                 is_progress=lambda item: item.get("status") == "downloading")
        return downloaded_model(items[0])

    async def model_info(self, model: str, *, timeout: float = 60.0) -> ModelInfo | None:
        """The catalog entry that ``model`` (an AIR or an alias) names on this server, or None when the
        server lists none by that name (it may still serve it, e.g. a Civitai checkpoint not fetched yet)."""
        wanted = model.strip().casefold()
        if not wanted or len(wanted) > MAX_SEARCH_LENGTH:  # a name no catalog entry has
            return None
        for info in await self.models(wanted, timeout=timeout):
            if wanted == info.air.casefold() or wanted in (alias.casefold() for alias in info.aliases):
                return info
        return None

    async def _default_size(self, model: str, width: int | None, height: int | None, *,
                            timeout: float) -> tuple[int | None, int | None]:
        """``width`` and ``height`` with the one left out (or both) taken from the model's defaults."""
        info = await self.model_info(model, timeout=timeout)
        if info is None:  # the server's answer to the task will say what is wrong
            return width, height
        return (info.defaultWidth if width is None else width, info.defaultHeight if height is None else height)

    # ------------------------------------------------------------------ sending and waiting

    async def _call(self, task: schema.Task, task_uuid: str, *, expected: int, timeout: float,
                    counted_key: str | None = None,
                    on_progress: Callable[[dict[str, Any]], None] | None = None,
                    is_progress: Callable[[dict[str, Any]], bool] = inference_progress) -> list[dict[str, Any]]:
        task_type = type(task).__struct_config__.tag
        assert isinstance(task_type, str)
        call = PendingCall(task_uuid=task_uuid, task_type=task_type, expected=expected, counted_key=counted_key,
                           on_progress=on_progress, is_progress=is_progress)
        self._calls.add(call)
        try:
            async with asyncio.timeout(timeout):
                await self.connect()
                await self._send(requests.encode_tasks([task]), call)
                return await call.future
        except TimeoutError:
            raise ImagewireError(
                TIMEOUT, f"No answer to {task_type} task {task_uuid} within {timeout:g} s.",
                task_uuid=task_uuid, task_type=task_type,
            ) from None
        finally:
            self._calls.remove(task_uuid)

    async def _send(self, frame: bytes, call: PendingCall) -> None:
        """Send ``frame`` on the live socket, waiting through a reconnection if one is under way."""
        while True:
            await self._connected.wait()
            self._raise_if_unusable()
            websocket = self._websocket
            assert websocket is not None
            try:
                await websocket.send(frame, text=True)
                return
            except ConnectionClosed:
                # It may or may not have reached the server; a resend that the server calls a
                # conflict is then ignored by the call (see PendingCall.on_error).
                call.resent = True
                if self._websocket is websocket:
                    self._connected.clear()

    # ------------------------------------------------------------------ the connection

    async def _open(self) -> ClientConnection:
        """A new socket, authenticated (resuming the session when there was one)."""
        try:
            websocket = await connect(self.url, max_size=self.max_frame_bytes, compression=None,
                                      open_timeout=self.connect_timeout)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ImagewireError(CONNECTION_FAILED, f"Cannot connect to {self.url}: {reason}.") from exc
        try:
            await websocket.send(requests.encode_tasks([requests.authentication(self.api_key, self._session_uuid)]),
                                 text=True)
            async with asyncio.timeout(self.connect_timeout):
                await self._await_authentication(websocket)
        except BaseException as exc:
            await websocket.close()
            if isinstance(exc, (TimeoutError, ConnectionClosed)):
                raise ImagewireError(CONNECTION_FAILED,
                                     f"{self.url} accepted the connection but did not answer authentication.") from exc
            raise
        self._last_heard = asyncio.get_running_loop().time()
        return websocket

    async def _await_authentication(self, websocket: ClientConnection) -> None:
        while True:
            envelope = self._decode(await websocket.recv())
            for error in envelope.errors or ():
                if error.get("taskType") == "authentication":
                    raise ImagewireError.from_item(error)
            answers = [item for item in envelope.data or () if item.get("taskType") == "authentication"]
            self._dispatch(envelope)
            if answers:
                self._session_uuid = answers[0].get("connectionSessionUUID") or self._session_uuid
                return

    async def _read_forever(self) -> None:
        """Read frames until the client closes; reconnect whenever the socket drops."""
        while True:
            websocket = self._websocket
            assert websocket is not None
            try:
                async for frame in websocket:
                    self._last_heard = asyncio.get_running_loop().time()
                    self._dispatch(self._decode(frame))
            except ConnectionClosed:
                pass
            self._connected.clear()
            log.info("connection to %s lost; reconnecting", self.url)
            try:
                self._websocket = await self._reconnect()
            except ImagewireError as error:
                self._failure = error
                self._connected.set()  # wake senders, so they see the failure
                self._calls.fail_all(error)
                return
            self._connected.set()

    async def _reconnect(self) -> ClientConnection:
        last_error: ImagewireError | None = None
        for attempt in range(self.reconnect_attempts):
            if attempt:
                await asyncio.sleep(min(RECONNECT_BASE_DELAY * 2 ** (attempt - 1), RECONNECT_MAX_DELAY))
            try:
                return await self._open()
            except ImagewireError as error:
                if error.code in _FATAL_AUTH_CODES:
                    raise
                last_error = error
                log.info("reconnection attempt %d failed: %s", attempt + 1, error)
        detail = f" (last: {last_error.message})" if last_error else ""
        raise ImagewireError(CONNECTION_LOST, f"The connection to {self.url} was lost and "
                             f"{self.reconnect_attempts} attempts to reconnect failed{detail}.")

    async def _keep_alive(self) -> None:
        """Ping at a steady pace; drop a socket that has gone silent so the reader reconnects."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            await self._connected.wait()
            if self._closed or self._failure is not None:
                return
            websocket = self._websocket
            assert websocket is not None
            if loop.time() - self._last_heard > self.silence_timeout:
                log.info("no answer from %s for %.0f s; reconnecting", self.url, loop.time() - self._last_heard)
                # A closing handshake would wait for the same silent peer; cut the socket instead.
                websocket.transport.abort()
                continue
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(requests.encode_tasks([requests.ping()]), text=True)

    # ------------------------------------------------------------------ inbound frames

    @staticmethod
    def _decode(frame: str | bytes) -> schema.Envelope:
        try:
            return _envelope_decoder.decode(frame)
        except msgspec.DecodeError:
            log.warning("ignoring a frame that is not an answer envelope: %.200r", frame)
            return schema.Envelope()

    def _dispatch(self, envelope: schema.Envelope) -> None:
        for item in envelope.data or ():
            if item.get("taskType") == "cancelTask":
                for cancelling in self._cancels.get(item.get("taskUUID") or "", ()):
                    cancelling.on_item(item)
                continue
            call = self._calls.get(item.get("taskUUID"))
            if call is not None:
                call.on_item(item)
        for item in envelope.errors or ():
            if item.get("taskType") == "cancelTask":
                for cancelling in self._cancels.get(item.get("taskUUID") or "", ()):
                    cancelling.on_error(item)
                continue
            call = self._calls.get(item.get("taskUUID"))
            if call is not None:
                call.on_error(item)
            elif item.get("taskType") not in ("authentication", "ping"):
                log.warning("server error not tied to a call in flight: %s: %s", item.get("code"), item.get("message"))
