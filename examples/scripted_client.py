"""A tunnel end driven from a trio program (simpletun.open_tunnel), e.g. inside a namespace:

    ip netns exec NS .venv/bin/python examples/scripted_client.py CONFIG.toml

Waits (without polling) until the peer is connected, adds a route live, prints the counters,
and closes the tunnel, which removes its device and routes.
"""

from __future__ import annotations

import json
import sys

import trio

import simpletun


async def main(path: str) -> None:
    async with simpletun.open_tunnel(path) as tunnel:
        await tunnel.wait_up(timeout=20)
        print("peer connected", flush=True)
        routes = tunnel.status()["peers"][0]["allowed_ips"]
        await tunnel.set_routes([*routes, "10.77.0.0/24"])
        print(json.dumps({"routes": tunnel.status()["peers"][0]["allowed_ips"]}), flush=True)
        await trio.sleep(0.5)
        print(json.dumps({"stats": tunnel.stats}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
