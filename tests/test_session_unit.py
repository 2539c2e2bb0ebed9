"""Session teardown paths that need a misbehaving peer: fast unit tests with fakes."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from asrd import wire
from asrd.bus import Msg, Subscription
from asrd.bus.memory import InMemoryBus
from asrd.config import Config
from asrd.control import ConnectInfo, StaticControlPlane
from asrd.dialects.alibaba import AlibabaCodec
from asrd.errors import ClientError
from asrd.events import TranscriptionStarted
from asrd.params import SessionParams
from asrd.registry import WorkerRegistry
from asrd.sentences import SentenceTracker
from asrd.session import GatewayState, Session


class StuckSocket:
    """A client that never reads: every send blocks forever."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_message(self, message: Any) -> None:
        self.sent += 1
        await trio.sleep_forever()

    async def get_message(self) -> Any:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


def make_session(**server: Any) -> tuple[Session, StuckSocket]:
    config = Config.model_validate({"server": server})
    bus = InMemoryBus()
    state = GatewayState(config, bus, WorkerRegistry(bus, "asrd", 1.0), StaticControlPlane(config))
    ws = StuckSocket()
    codec = AlibabaCodec()
    codec.receive_text(
        '{"header":{"message_id":"' + "a" * 32 + '","task_id":"' + "b" * 32 + '",'
        '"namespace":"SpeechTranscriber","name":"StartTranscription","appkey":"k"}}'
    )
    session = Session(state, ws, codec, ConnectInfo("GET", "/ws/v1", {}, None))  # type: ignore[arg-type]
    return session, ws


async def test_a_client_that_reads_nothing_is_dropped_after_send_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    session, ws = make_session(send_timeout_s=3.0)
    session._out_send.send_nowait(TranscriptionStarted("s"))
    with pytest.raises(ClientError, match="read no results for 3 s"):
        await session._send_loop()
    assert ws.sent == 1


async def test_results_piling_up_end_the_session_as_a_slow_consumer() -> None:
    """Results the client does not take fill a bounded queue; then the session ends."""
    session, _ = make_session()
    session.tracker = SentenceTracker(SessionParams())
    results = Subscription("asrd.session.s.out", max_pending=2)
    partial = wire.Result(False, 1, 100, "hello", (), 0.0).encode()
    for _ in range(3):  # one more than fits: the bus marks the subscription overflowed
        results.deliver(Msg(results.subject, partial))

    class Remote:
        def __init__(self) -> None:
            self.results = results

    session.remote = Remote()  # type: ignore[assignment]
    with pytest.raises(ClientError, match="too slow a consumer"):
        await session._results_loop()
