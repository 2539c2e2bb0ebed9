"""Fixtures: real nats-server, real engine worker processes, an in-process gateway."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from asrd.bus.natsbus import open_nats_bus
from asrd.config import Config
from asrd.control import StaticControlPlane
from asrd.gateway import Gateway
from tests.servers import nats_server, start_workers


@dataclass
class Nats:
    proc: subprocess.Popen[bytes]
    url: str
    port: int


@dataclass
class Pool:
    """Worker processes serving one pool (language) name."""

    name: str
    workers: list[subprocess.Popen[bytes]]
    decoders: int

    @property
    def capacity(self) -> int:
        return len(self.workers) * self.decoders


@pytest.fixture(scope="session")
def nats() -> Iterator[Nats]:
    with nats_server() as (proc, url, port):
        yield Nats(proc, url, port)


@pytest.fixture(scope="session")
def pool(nats: Nats) -> Iterator[Pool]:
    """Two workers with two pocketsphinx decoders each, shared by the integration tests."""
    with ExitStack() as stack:
        yield Pool("it-en", start_workers(stack, 2, nats.url, "it-en", 2), 2)


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    port: int


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@asynccontextmanager
async def open_gateway(
    nats_url: str, pool: Pool, **sections: dict[str, Any]
) -> AsyncIterator[RunningGateway]:
    server = {"port": 0, "default_language": pool.name, **sections.pop("server", {})}
    config = Config.model_validate(
        {"server": server, "nats": {"url": nats_url, **sections.pop("nats", {})}, **sections}
    )
    async with open_nats_bus(config.nats, nats_url, name="test-gateway") as bus:
        gw = Gateway(config, bus, StaticControlPlane(config))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(gw.serve, wait_for_workers=len(pool.workers)))
            yield RunningGateway(gw, f"ws://127.0.0.1:{port}/ws/v1", port)
            gw.stop_requested.set()


@pytest.fixture
async def gateway(nats: Nats, pool: Pool) -> AsyncIterator[RunningGateway]:
    async with open_gateway(nats.url, pool) as gw:
        yield gw
