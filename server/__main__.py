"""``python -m server`` / ``imagewire-server``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from server.app import ImagewireServer
from server.config import parse_args


async def serve(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = ImagewireServer(config)
    await server.start()
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


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(argv))


if __name__ == "__main__":
    main()
