"""A typed request/answer exchange between stages: an *asker* half asks, a *server* half answers.

The env stage asks the policy stage for actions once per env step. A pair of streams (requests one way, answers
the other) would cost two trips through the scheduler per step; an exchange costs none when both ends share a
process::

    asker, server = open_exchange(0, name="policy.requests", server="policy")

    async def policy_stage():                      # the server registers its handler once
        await server.serve(lambda request: answer_to(request))   # returns once every asker closed

    async def env_stage():
        with asker:                                # closing the last asker ends the exchange
            for step in ...:
                answer = await asker.ask(request)  # the handler's return value

``capacity=0`` is a **rendezvous hand-off**: ``ask`` calls the handler itself, in the asking task, with no trip
through the scheduler. A handler returns its answer, or an awaitable of it (an object with ``__await__``: a
coroutine, a future) when it must wait (a policy waiting for the learner's weights under ``max_policy_lag``):
``ask`` then awaits it. An answer is never itself an awaitable. Several askers (two env stages
sharing one policy) are served one at a time: while one waits inside an awaitable handler, the others queue.

``capacity>=1`` is a **scheduled stream**: up to ``capacity`` requests queue, and the server's own task (the one
in ``serve``) answers them in order. It is the general path, and what the hand-off is tested against.

Accounting: the handler's work is the *server's* work wherever it runs. :attr:`Server.waited_s` (which a stage's
busy fraction sums) is the time spent parked in ``serve`` less the time spent in handlers called by askers;
:attr:`Asker.waited_s` includes the handler's time (the asking stage waited for the answer). ``statistics()``
reports the exchange like a stream (:class:`~streamrl.streams.StreamStatistics`: requests asked and answered,
the askers' and the server's waits), so a run's summary lists it among its streams.

Ends and failures:

* every asker closed: ``serve`` returns (the server stage's normal end);
* the server half closed (its stage ended or failed): ``ask`` raises :class:`~streamrl.errors.BrokenStreamError`,
  an asker's normal end;
* a handler raises: ``ask`` raises :class:`~streamrl.errors.StageFailed` naming the *server's* stage, with the
  handler's exception as its cause (in the scheduled mode the server's own task raises it). A handler that raises
  ``BrokenStreamError`` ends the exchange instead (it closed the server half: e.g. the learner it waited for
  ended);
* a cancelled ``ask`` (inside an awaitable handler too) leaves the exchange consistent: the next asker is served.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, Union

from streamrl.errors import BrokenStreamError, ClosedStreamError, ConfigError, StageFailed
from streamrl.streams import StreamStatistics

_clock = time.perf_counter
Req = TypeVar("Req")
Ans = TypeVar("Ans")
Handler = Callable[[Req], Union[Ans, Awaitable[Ans]]]  # noqa: UP007 - a runtime alias of TypeVars


class _Exchange(Generic[Req, Ans]):
    """The state both halves share."""

    __slots__ = ("answered", "asked", "asker_wait_s", "busy", "capacity", "handler", "inline_s",
                 "max_depth", "name", "open_askers", "queue", "room", "server", "server_closed", "server_wait_s",
                 "turns", "wake_server")

    def __init__(self, capacity: int, name: str, server: str) -> None:
        self.capacity = capacity
        self.name = name
        self.server = server  # the stage errors name when a handler fails
        self.handler: Handler[Req, Ans] | None = None  # set by serve
        self.open_askers = 0
        self.server_closed = False
        self.busy = False  # rendezvous: an asker is inside an awaitable handler
        self.turns: deque[asyncio.Future[None]] = deque()  # askers waiting for the handler (or for serve)
        self.queue: deque[tuple[Req, asyncio.Future[Ans]]] = deque()  # scheduled: requests not yet answered
        self.room: deque[asyncio.Future[None]] = deque()  # scheduled: askers waiting for room in the queue
        self.wake_server: asyncio.Future[None] | None = None  # the server parked in serve
        self.asked = 0
        self.answered = 0
        self.max_depth = 0
        self.asker_wait_s = 0.0
        self.server_wait_s = 0.0
        self.inline_s = 0.0  # time spent in handlers that askers called (rendezvous): the server's work

    def broken(self) -> BrokenStreamError:
        return BrokenStreamError(f"exchange {self.name!r}: its server (stage {self.server!r}) ended; no answer "
                                 "will come")

    def wake(self) -> None:
        fut = self.wake_server
        if fut is not None and not fut.done():
            fut.set_result(None)

    def end(self) -> None:
        """The server closed: wake everyone so that they see it (queued requests get BrokenStreamError)."""
        self.server_closed = True
        self.wake()
        for waiters in (self.turns, self.room):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
        while self.queue:
            _, answer = self.queue.popleft()
            if not answer.done():
                answer.set_exception(self.broken())

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            name=self.name, capacity=self.capacity, items_sent=self.asked, items_received=self.answered,
            depth=len(self.queue), max_depth=self.max_depth, dropped=0, producer_wait_s=self.asker_wait_s,
            consumer_wait_s=max(0.0, self.server_wait_s - self.inline_s), open_send_halves=self.open_askers,
            open_receive_halves=0 if self.server_closed else 1,
        )


async def _park(waiters: deque[asyncio.Future[None]]) -> None:
    """Wait in line in ``waiters`` until woken. A waiter woken and then cancelled passes the wake-up on, so that
    the line never stalls (every waiter checks again what it waits for once woken)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    except BaseException:
        if fut in waiters:
            waiters.remove(fut)
        elif fut.done() and not fut.cancelled():
            _wake(waiters)
        raise


class Asker(Generic[Req, Ans]):
    """The asking half: :meth:`ask` sends a request and returns its answer. ``clone()`` for another asker."""

    __slots__ = ("_closed", "_state", "waited_s")

    def __init__(self, state: _Exchange[Req, Ans]) -> None:
        self._state = state
        self._closed = False
        self.waited_s = 0.0  # time spent in ask: waiting for the server, its handler's work included
        state.open_askers += 1

    @property
    def name(self) -> str:
        return self._state.name

    async def ask(self, request: Req) -> Ans:
        """The server's answer to ``request``; see the module docstring for the two modes and the errors."""
        st = self._state
        if self._closed:
            raise ClosedStreamError(f"asker of exchange {st.name!r} was closed; it cannot ask any more")
        start = started = _clock()
        end = 0.0  # set once the handler returned: the fast path reads the clock twice per ask
        try:
            if st.capacity:
                return await self._queue(request)
            # rendezvous: call the handler here, once it is registered and no other asker is inside it
            if st.handler is None or st.busy or st.turns or st.server_closed:
                await self._wait_for_turn()
                started = _clock()
            handler = st.handler
            assert handler is not None
            st.asked += 1
            try:
                answer = handler(request)
                if hasattr(answer, "__await__"):  # an awaitable answer: the handler waits for something
                    st.busy = True
                    answer = await answer
            except BrokenStreamError:
                raise  # the handler ended the exchange (the server closed): an asker's normal end
            except Exception as exc:
                raise StageFailed(st.server, exc) from exc
            finally:
                st.busy = False
                end = _clock()
                st.inline_s += end - started
                if st.turns:
                    _wake(st.turns)  # the next asker in line
            st.answered += 1
            return answer  # type: ignore[no-any-return]
        finally:
            if not end:
                end = _clock()
            waited = end - start
            self.waited_s += waited
            st.asker_wait_s += waited

    async def _wait_for_turn(self) -> None:
        """Wait until the handler is registered and free, behind the askers already waiting (FIFO)."""
        st = self._state
        while st.handler is None or st.busy or st.turns:
            if st.server_closed:
                raise st.broken()
            await _park(st.turns)
            if st.handler is not None and not st.busy:
                break  # our turn: the one woken was first in line
        if st.server_closed:
            raise st.broken()

    async def _queue(self, request: Req) -> Ans:
        """Scheduled: queue the request (waiting for room) and await the server task's answer."""
        st = self._state
        while len(st.queue) >= st.capacity:
            if st.server_closed:
                raise st.broken()
            await _park(st.room)
        if st.server_closed:
            raise st.broken()
        answer: asyncio.Future[Ans] = asyncio.get_running_loop().create_future()
        st.queue.append((request, answer))
        st.asked += 1
        st.max_depth = max(st.max_depth, len(st.queue))
        st.wake()
        try:
            return await answer
        except asyncio.CancelledError:
            answer.cancel()  # the server skips it
            raise

    def clone(self) -> Asker[Req, Ans]:
        """Another asker of the same exchange (fan-in: several env stages ask one policy)."""
        if self._closed:
            raise ClosedStreamError(f"cannot clone the closed asker of exchange {self._state.name!r}")
        return Asker(self._state)

    def close(self) -> None:
        """Close this asker; once every asker is closed, the server's ``serve`` returns."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        st.open_askers -= 1
        if st.open_askers == 0:
            st.wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> StreamStatistics:
        return self._state.statistics()

    def __enter__(self) -> Asker[Req, Ans]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Asker({self._state.name!r}, closed={self._closed})"


class Server(Generic[Req, Ans]):
    """The serving half: :meth:`serve` registers the handler and returns when the exchange ends."""

    __slots__ = ("_parked_at", "_parked_s", "_state")

    def __init__(self, state: _Exchange[Req, Ans]) -> None:
        self._state = state
        self._parked_s = 0.0
        self._parked_at: float | None = None

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def waited_s(self) -> float:
        """Seconds the server waited for requests: parked in ``serve``, less the handler's work done by askers."""
        parked = self._parked_s
        if self._parked_at is not None:
            parked += _clock() - self._parked_at
        return max(0.0, parked - self._state.inline_s)

    async def serve(self, handler: Handler[Req, Ans], *, stage: str | None = None) -> None:
        """Answer every request with ``handler(request)`` (an answer, or an awaitable of one) until every asker
        closed. ``stage`` is the name errors give the server (default: the one given to :func:`open_exchange`)."""
        st = self._state
        if st.handler is not None:
            raise ConfigError(f"exchange {st.name!r} is already served; one server answers an exchange")
        if stage is not None:
            st.server = stage
        st.handler = handler
        _wake(st.turns)  # askers that came before the handler
        while True:
            if st.capacity and st.queue:
                try:
                    await self._answer(handler)
                except BrokenStreamError:  # the handler ended the exchange
                    self.close()
                    return
                continue
            if st.server_closed or st.open_askers == 0:
                return
            await self._park()

    async def _park(self) -> None:
        st = self._state
        fut = st.wake_server = asyncio.get_running_loop().create_future()
        self._parked_at = start = _clock()
        try:
            await fut
        finally:
            st.wake_server = None
            self._parked_at = None
            waited = _clock() - start
            self._parked_s += waited
            st.server_wait_s += waited

    async def _answer(self, handler: Handler[Req, Ans]) -> None:
        """Scheduled mode: answer the oldest queued request (in this task: the server's own work)."""
        st = self._state
        request, answer = st.queue.popleft()
        if st.room:
            _wake(st.room)
        if answer.done():  # its asker was cancelled
            return
        try:
            result = handler(request)
            if hasattr(result, "__await__"):
                result = await result
        except BaseException:
            if not answer.done():
                answer.set_exception(st.broken())  # the server's failure is its own stage's error
            raise
        st.answered += 1
        if not answer.done():
            answer.set_result(result)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the server half: askers get ``BrokenStreamError`` (those waiting, and every later ``ask``)."""
        st = self._state
        if not st.server_closed:
            st.end()

    @property
    def closed(self) -> bool:
        return self._state.server_closed

    def statistics(self) -> StreamStatistics:
        return self._state.statistics()

    def __repr__(self) -> str:
        return f"Server({self._state.name!r}, closed={self._state.server_closed})"


def _wake(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return


def open_exchange(capacity: int = 0, *, name: str = "exchange", server: str = "server"
                  ) -> tuple[Asker[Req, Ans], Server[Req, Ans]]:
    """Create an exchange and return its ``(asker, server)`` halves.

    ``capacity`` 0 is the rendezvous hand-off (the asker calls the handler), >= 1 a scheduled stream of that many
    queued requests. ``server`` names the serving stage in errors (a failing handler fails the run naming it).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ConfigError(f"exchange {name!r}: capacity must be an int >= 0 (0: a rendezvous hand-off), got "
                          f"{capacity!r}")
    state: _Exchange[Req, Ans] = _Exchange(capacity, name, server)
    return Asker(state), Server(state)
