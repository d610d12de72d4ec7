"""``python -m imagewire.server`` / ``imagewire-server``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from imagewire.server.config import Config, parse_args, version
from imagewire.server.logs import configure as configure_logging

log = logging.getLogger("imagewire.server")


async def serve(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    # Said before anything slow (imports, the key, the model): a start is never silent.
    log.info("imagewire-server %s starting: %s on %s, default model %s; it answers on port %s once that is loaded",
             version(), "no model (--engine fake)" if config.engine == "fake" else f"--engine {config.engine}",
             config.device, config.default_model, config.port or "(any free)")
    # Imported here, after the first line: the server's modules take about a second to import.
    from imagewire.server.app import ImagewireServer
    from imagewire.server.handshakes import raise_open_file_limit

    raise_open_file_limit()
    server = ImagewireServer(config, freeze_at_start=True)
    try:
        await server.start()
    except (ValueError, OSError) as exc:  # a wrong --device, a taken port, an unreadable catalog
        print(f"imagewire-server: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        # Logged here, not left to the interpreter: with --engine ray, Ray's hook for uncaught errors would hold
        # the process for a minute, waiting on the cluster that is stopping with it.
        log.exception("the server could not start")
        raise SystemExit(1) from None
    if server.generated_key:
        print(f"\nGenerated an API key (kept in {config.data_dir / 'api-key'}, readable only by you):\n"
              f"    {server.generated_key}\n", file=sys.stderr, flush=True)
    print(banner(server.config, server.url), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("signal received; shutting down")
    await server.stop()
    if server.device.busy:
        # The grace period ran out with a job still on the device. Interpreter shutdown would
        # tear torch down under that thread (SIGABRT); the tasks were answered, so leave now.
        log.info("leaving a device job unfinished")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)


def banner(config: Config, url: str) -> str:
    """What a person needs once the server answers: where clients connect, where the playground is, the key."""
    key = (f"the key kept in {(config.data_dir / 'api-key').resolve()}" if not config.api_keys
           else f"{'the key' if len(config.api_keys) == 1 else 'the keys'} given with --api-key")
    return (f"imagewire ready: {url}\n"
            f"    playground: {config.base_url}/\n"
            f"    REST:       POST {config.base_url}/v1 (Authorization: Bearer KEY)\n"
            f"    API key:    {key}")


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(argv))


if __name__ == "__main__":
    main()
