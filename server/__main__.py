"""``python -m imagewire.server`` / ``imagewire-server``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from imagewire.server.app import ImagewireServer
from imagewire.server.config import parse_args
from imagewire.server.handshakes import raise_open_file_limit
from imagewire.server.logs import configure as configure_logging


async def serve(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    raise_open_file_limit()
    server = ImagewireServer(config)
    try:
        await server.start()
    except (ValueError, OSError) as exc:  # a wrong --device, a taken port, an unreadable catalog
        print(f"imagewire-server: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if server.generated_key:
        print(f"\nGenerated an API key (kept in {config.data_dir / 'api-key'}, readable only by you):\n"
              f"    {server.generated_key}\n", file=sys.stderr, flush=True)
    print(f"imagewire ready: {server.url}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logging.getLogger("imagewire.server").info("signal received; shutting down")
    await server.stop()
    if server.device.busy:
        # The grace period ran out with a job still on the device. Interpreter shutdown would
        # tear torch down under that thread (SIGABRT); the tasks were answered, so leave now.
        logging.getLogger("imagewire.server").info("leaving a device job unfinished")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(argv))


if __name__ == "__main__":
    main()
