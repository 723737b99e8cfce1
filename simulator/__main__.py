"""`python -m simulator [--config PATH]`: the simulated backends alone, on the configured
ports (for benchmarks, or to run the gateway against them by hand)."""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from config.schema import load
from simulator.cluster import start_for_config


async def serve(config_path: str | None) -> None:
    cluster = await start_for_config(load(config_path))
    print(f"simulators ready: {len(cluster.backends)} backends", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulator")
    parser.add_argument("--config", help="config whose endpoints to simulate")
    args = parser.parse_args()
    uvloop.run(serve(args.config))


if __name__ == "__main__":
    main()
