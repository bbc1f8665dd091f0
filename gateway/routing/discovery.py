"""Where the scheduler replicas are: a static address list, or a DNS name re-resolved periodically
(a Kubernetes headless Service answers with one A/AAAA record per ready pod)."""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse_addresses(spec: str) -> list[str]:
    """`a:1,b:2` -> ["a:1", "b:2"] (blanks and duplicates dropped, order kept); ValueError naming a
    malformed entry."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"scheduler address {item!r} is not HOST:PORT")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError("no scheduler address given")
    return out


def split_dns_target(spec: str) -> tuple[str, int]:
    """`NAME:PORT` -> (NAME, PORT); ValueError otherwise."""
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--scheduler-dns {spec!r} is not NAME:PORT")
    return host, int(port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve_all(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), as HOST:PORT, sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({format_address(info[4][0], port) for info in infos})


class DnsDiscovery:
    """Calls `on_change(addresses)` with the resolved set at start and whenever it changes. A failed
    lookup keeps the last good set (a DNS blip must not empty the rotation)."""

    def __init__(self, target: str, interval_s: float, on_change: Callable[[list[str]], None],
                 resolve: Resolver = resolve_all) -> None:
        self.host, self.port = split_dns_target(target)
        self.interval_s = max(0.1, interval_s)
        self._on_change = on_change
        self._resolve = resolve
        self._task: asyncio.Task | None = None
        self.addresses: list[str] | None = None

    async def refresh(self) -> None:
        try:
            found = await self._resolve(self.host, self.port)
        except OSError as e:
            logger.warning("resolving %s failed (%s); keeping %s", self.host, e, self.addresses)
            return
        if not found:
            logger.warning("%s resolved to no address; keeping %s", self.host, self.addresses)
            return
        if found != self.addresses:
            logger.info("%s:%d resolves to %s", self.host, self.port, ", ".join(found))
            self.addresses = found
            self._on_change(found)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
