"""Streams: bounded buffering, close/end-of-stream, fan-in, lossy overflow, statistics."""

import asyncio
import tracemalloc

import anyio
import numpy as np
import pytest

from streamrl import BrokenStreamError, ClosedStreamError, EndOfStream, WouldBlock, open_stream


async def test_items_arrive_in_order_and_the_stream_ends_when_the_sender_closes():
    send, receive = open_stream(2, name="s")
    got = []

    async def producer():
        with send:
            for i in range(10):
                await send.send(i)

    async def consumer():
        async for item in receive:
            got.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        tg.start_soon(consumer)
    assert got == list(range(10))
    with pytest.raises(EndOfStream):
        await receive.receive()


async def test_a_full_buffer_makes_the_producer_wait():
    send, receive = open_stream(3)
    for i in range(3):
        send.send_nowait(i)
    with pytest.raises(WouldBlock):
        send.send_nowait(3)
    blocked = asyncio.ensure_future(send.send(3))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert receive.receive_nowait() == 0
    await asyncio.wait_for(blocked, 1)
    stats = send.statistics()
    assert stats.depth == 3 and stats.max_depth == 3 and stats.items_sent == 4
    assert stats.producer_wait_s > 0.005


async def test_slow_consumer_keeps_memory_flat_and_the_producer_waits():
    """A fast producer of 100 KB items and a slow consumer: memory stays at a few items, the producer waits."""
    send, receive = open_stream(2, name="flat")
    peaks = []

    async def producer():
        with send:
            for _ in range(200):
                await send.send(np.ones(100_000, dtype=np.uint8))

    async def consumer():
        async for _item in receive:
            await asyncio.sleep(0.001)
            peaks.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            tg.start_soon(consumer)
    finally:
        tracemalloc.stop()
    # at most capacity + one in the producer's hands + one in the consumer's: well under 1 MB of items
    assert max(peaks) - min(peaks) < 600_000
    stats = send.statistics()
    assert stats.max_depth <= 2
    assert stats.producer_wait_s > 0.1  # the producer spent its time waiting for the consumer


async def test_consumer_waits_are_counted():
    send, receive = open_stream(1)

    async def later():
        await asyncio.sleep(0.02)
        await send.send("x")

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        assert await receive.receive() == "x"
    assert receive.statistics().consumer_wait_s >= 0.015
    assert receive.waited_s >= 0.015


async def test_fan_in_ends_only_when_every_clone_closed():
    send, receive = open_stream(4)
    other = send.clone()
    send.send_nowait(1)
    send.close()
    other.send_nowait(2)
    assert [receive.receive_nowait(), receive.receive_nowait()] == [1, 2]
    with pytest.raises(WouldBlock):
        receive.receive_nowait()
    other.close()
    with pytest.raises(EndOfStream):
        receive.receive_nowait()


async def test_closed_receiver_breaks_the_sender_and_closed_halves_refuse_use():
    send, receive = open_stream(1)
    receive.close()
    with pytest.raises(BrokenStreamError, match="no receiver"):
        await send.send(1)
    send.close()
    with pytest.raises(ClosedStreamError, match="closed"):
        send.send_nowait(1)
    with pytest.raises(ClosedStreamError):
        await receive.receive()


async def test_a_waiting_sender_is_released_with_an_error_when_the_receiver_closes():
    send, receive = open_stream(1)
    send.send_nowait(0)
    waiting = asyncio.ensure_future(send.send(1))
    await asyncio.sleep(0)
    receive.close()
    with pytest.raises(BrokenStreamError):
        await asyncio.wait_for(waiting, 1)


async def test_lossy_stream_drops_oldest_and_counts_drops():
    send, receive = open_stream(2, overflow="drop_oldest")
    for i in range(5):
        await send.send(i)
    assert send.statistics().dropped == 3
    assert [receive.receive_nowait(), receive.receive_nowait()] == [3, 4]
    receive.close()
    await send.send(9)  # a lossy stream with no receiver drops instead of failing
    assert send.statistics().dropped == 4


async def test_latest_nowait_returns_the_newest_item():
    send, receive = open_stream(3)
    assert receive.latest_nowait() is None
    for i in range(3):
        send.send_nowait(i)
    assert receive.latest_nowait() == 2
    assert receive.statistics().depth == 0


async def test_rendezvous_stream_returns_once_the_item_is_taken():
    send, receive = open_stream(0)
    sent = asyncio.ensure_future(send.send("a"))
    await asyncio.sleep(0.01)
    assert not sent.done()
    assert await receive.receive() == "a"
    await asyncio.wait_for(sent, 1)


async def test_cancelled_waiter_leaves_no_trace():
    send, receive = open_stream(1)
    with anyio.move_on_after(0.01):
        await receive.receive()
    send.send_nowait(1)
    assert await receive.receive() == 1


def test_invalid_arguments_are_rejected_with_a_message():
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        open_stream(-1)
    with pytest.raises(ValueError, match="lossy"):
        open_stream(0, overflow="drop_oldest")
    with pytest.raises(ValueError, match="overflow must be"):
        open_stream(1, overflow="sometimes")


async def test_rendezvous_fan_in_delivers_every_item():
    """Two senders on a capacity-0 stream, one of them idle after its first item: nothing gets stuck."""
    send, receive = open_stream(0)
    first, second = send.clone(), send.clone()
    send.close()
    got = []

    async def idle_after_one():
        await first.send("a")
        await anyio.sleep(3600)

    async def five():
        for i in range(5):
            await second.send(f"b{i}")
        second.close()

    async def consume():
        async for item in receive:
            got.append(item)
            await anyio.sleep(0)

    with anyio.move_on_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(idle_after_one)
            tg.start_soon(five)
            tg.start_soon(consume)
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
    assert sorted(got) == ["a", "b0", "b1", "b2", "b3", "b4"]
