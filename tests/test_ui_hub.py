"""The dashboard's hub: how often it reads the board while the project keeps changing (aipm.ui.stream.Hub).

The reads here are stand-ins that take a real amount of time (an asyncio sleep); what is checked is how the hub
spaces them relative to how long each one took, measured on the same loop clock, so no figure depends on this
machine's speed."""

import asyncio

import pytest

pytest.importorskip("starlette")  # the `ui` extra

from aipm.ui.stream import PACE, Hub  # noqa: E402


def recorded_reads(seconds: float = 0.05):
    """A started Hub, and a board read that takes `seconds` on the loop clock and notes (began, ended) in a list."""
    hub = Hub(None, None)
    hub.start()
    loop = asyncio.get_running_loop()
    reads: list[tuple[float, float]] = []

    async def read():
        began = loop.time()
        await asyncio.sleep(seconds)
        reads.append((began, loop.time()))
        return {"n": len(reads)}

    return hub, read, reads


def test_a_board_changing_all_the_time_is_read_at_most_a_tenth_of_the_time():
    """A run of quick tasks changes the board many times a second: each read began as soon as the last ended, and
    an open page of a 3,000-task order kept a core busy beside the workers."""

    async def scenario():
        hub, read, reads = recorded_reads()
        for _ in range(5):
            hub._wake(True, set())  # a change, as the project watch reports one
            await hub.board(read)
        return reads

    reads = asyncio.run(scenario())
    assert len(reads) == 5
    for (began, ended), (next_began, _) in zip(reads, reads[1:]):
        assert next_began - ended >= PACE * (ended - began) * 0.99, reads


def test_pages_woken_while_a_read_waits_for_its_pace_share_that_read():
    async def scenario():
        hub = Hub(None, None)
        hub.start()
        count = 0

        async def read():
            nonlocal count
            count += 1
            await asyncio.sleep(0.02)
            return {"read": count}

        hub._wake(True, set())
        first = await hub.board(read)
        hub._wake(True, set())
        waiting = asyncio.ensure_future(hub.board(read))  # paced: it waits before it reads
        await asyncio.sleep(0)
        hub._wake(True, set())  # a change while it waits: the read it starts covers it
        joined = await asyncio.gather(waiting, hub.board(read), hub.board(read))
        return first, joined, count

    first, joined, count = asyncio.run(scenario())
    assert first == {"read": 1}
    assert joined == [{"read": 2}] * 3
    assert count == 2


def test_a_change_during_a_read_is_read_after_it_and_its_pause_not_beside_it():
    async def scenario():
        hub, read, reads = recorded_reads()
        hub._wake(True, set())
        first = asyncio.ensure_future(hub.board(read))
        await asyncio.sleep(0.01)  # the first read is under way
        hub._wake(True, set())  # a change it may not cover: another stream asks again
        await asyncio.gather(first, hub.board(read))
        return reads

    (began, ended), (next_began, _) = asyncio.run(scenario())
    assert next_began - ended >= PACE * (ended - began) * 0.99


def test_a_stop_ends_the_pause_of_a_waiting_read():
    """Ctrl-C of `aipm ui`: a read waiting for its pace goes at once, so the streams can end."""

    async def scenario():
        hub = Hub(None, None)
        hub.start()
        loop = asyncio.get_running_loop()

        async def slow():
            await asyncio.sleep(0.3)  # its pause after: 1.2 s
            return {}

        hub._wake(True, set())
        await hub.board(slow)
        hub._wake(True, set())
        waiting = asyncio.ensure_future(hub.board(lambda: asyncio.sleep(0, {"after": True})))
        await asyncio.sleep(0.01)
        asked = loop.time()
        hub.stop()
        result = await waiting
        return result, loop.time() - asked

    result, took = asyncio.run(scenario())
    assert result == {"after": True}
    assert took < 0.3 * PACE / 2  # not the whole pause
