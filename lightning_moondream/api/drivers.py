"""Drivers: a call's requests and waits, carried out blocking or awaited.

A call of either API (tuning or inference) is written once as *steps*: a generator
that yields what it needs done, a ``Send`` (a request to send) or a number (seconds to
wait), and receives what came of it: the ``httpx.Response``, or the
``httpx.RequestError`` raised instead (a wait receives ``None``). Its ``return`` value
is the call's result. Steps never do I/O themselves, so each rule of retrying, pacing
and counting usage is written once, for both kinds of client.

A driver carries the steps out. ``BlockingDriver`` does so with an ``httpx.Client`` and
``time.sleep``, ``AsyncDriver`` with an ``httpx.AsyncClient`` and ``asyncio.sleep``;
each is the I/O half of a client class, which also runs many calls at once and closes
the HTTP client it owns.

A method that only builds a call and carries out its steps is written once for both
clients, as a ``DrivenMethod``: the blocking client's driver returns the result, the
async one's a coroutine of it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import httpx

from lightning_moondream.api.inprocess import InProcessAsyncTransport, InProcessTransport
from lightning_moondream.api.pools import async_transport, blocking_transport

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
A = TypeVar("A")
C = TypeVar("C")
P = ParamSpec("P")


@dataclass(frozen=True)
class Send:
    """A request for the driver to send.

    Attributes:
        request: What to send.
        stream: Return a successful answer as soon as its headers arrive, its body still
            to read; a failed one is read and closed first.
    """

    request: httpx.Request
    stream: bool = False


Outcome = httpx.Response | httpx.RequestError
"""What came of sending a request: the answer, or why none came."""
Steps = Generator[Send | float, Any, T]
"""A call as the requests and waits it needs: sent an ``Outcome`` for each ``Send``."""


def check_concurrency(max_concurrency: int) -> None:
    """Refuse a bound on calls in flight below one.

    Raises:
        ValueError: Naming ``max_concurrency`` and its value.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")


class BlockingDriver:
    """Carries out steps with a blocking ``httpx.Client``."""

    _http: httpx.Client
    _owns_http: bool

    def _sleep(self, seconds: float) -> None:
        """Wait before retrying (a test gives the client a fake one)."""
        time.sleep(seconds)

    def _default_http_client(self) -> httpx.Client:
        self._direct = blocking_transport()
        return httpx.Client() if self._direct is None else httpx.Client(transport=self._direct)

    @classmethod
    def _in_process_http_client(cls, app: Any, on_close: Callable[[], None]) -> httpx.Client:
        return httpx.Client(transport=InProcessTransport(app, on_close=on_close))

    def _run(self, steps: Steps[T]) -> T:
        """Carry out a call's steps; return its result.

        A request goes straight to the transport of an httpx client this client made:
        httpx's client adds cookies, redirects, auth and event hooks, none of which a
        client of this API uses, at about 0.3 ms a request.
        """
        came: Outcome | None = None
        try:
            while True:
                step = steps.send(came)
                if not isinstance(step, Send):
                    self._sleep(step)
                    came = None
                    continue
                request = step.request
                try:
                    if self._direct is None:
                        came = self._http.send(request, stream=step.stream)
                    else:
                        came = self._direct.handle_request(request)
                        came.request = request
                    # Read to its end and closed: an answer not streamed that came straight
                    # from the transport (httpx reads the others), or a failed stream.
                    unread = not step.stream and self._direct is not None
                    if unread or (step.stream and not came.is_success):
                        try:
                            came.read()
                        finally:
                            came.close()
                except httpx.RequestError as exc:
                    exc.request = request
                    came = exc
        except StopIteration as stop:
            return stop.value

    @staticmethod
    def _concurrently(run: Callable[[A], T], items: Sequence[A], max_concurrency: int) -> list[T]:
        """``run`` each item on threads, at most ``max_concurrency`` at once.

        Results come in input order; the first failure cancels the runs not yet started
        and is raised.
        """
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            futures = [pool.submit(run, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncDriver:
    """Carries out steps with an ``httpx.AsyncClient``."""

    _http: httpx.AsyncClient
    _owns_http: bool

    async def _sleep(self, seconds: float) -> None:
        """Wait before retrying (a test gives the client a fake one)."""
        await asyncio.sleep(seconds)

    def _default_http_client(self) -> httpx.AsyncClient:
        self._direct = async_transport()
        if self._direct is None:
            return httpx.AsyncClient()
        return httpx.AsyncClient(transport=self._direct)

    @classmethod
    def _in_process_http_client(cls, app: Any, on_close: Callable[[], None]) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=InProcessAsyncTransport(app, on_close=on_close))

    async def _run(self, steps: Steps[T]) -> T:
        """Carry out a call's steps; return its result (as ``BlockingDriver._run``)."""
        came: Outcome | None = None
        try:
            while True:
                step = steps.send(came)
                if not isinstance(step, Send):
                    await self._sleep(step)
                    came = None
                    continue
                request = step.request
                try:
                    if self._direct is None:
                        came = await self._http.send(request, stream=step.stream)
                    else:
                        came = await self._direct.handle_async_request(request)
                        came.request = request
                    # Read to its end and closed: an answer not streamed that came straight
                    # from the transport (httpx reads the others), or a failed stream.
                    unread = not step.stream and self._direct is not None
                    if unread or (step.stream and not came.is_success):
                        try:
                            await came.aread()
                        finally:
                            await came.aclose()
                except httpx.RequestError as exc:
                    exc.request = request
                    came = exc
        except StopIteration as stop:
            return stop.value

    @staticmethod
    async def _concurrently(
        run: Callable[[A], Awaitable[T]], items: Sequence[A], max_concurrency: int
    ) -> list[T]:
        """Await ``run`` of each item, at most ``max_concurrency`` at once.

        Results come in input order; the first failure cancels the others and is raised.
        ``max_concurrency`` workers take the items in order, rather than a task for
        each item waiting on a semaphore: no task is made or woken for nothing.
        """
        results: list[Any] = [None] * len(items)
        pending = iter(enumerate(items))

        async def work() -> None:
            for index, item in pending:
                results[index] = await run(item)

        workers = [asyncio.ensure_future(work()) for _ in range(min(max_concurrency, len(items)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        return results

    async def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ClientMethod:
    """What a method of both client classes, written once, is besides its types.

    It is named after the attribute it is set to, and has the signature and the
    documentation of ``like``, the function that builds its call (or ``doc``). A
    subclass's ``__get__`` says what the method returns on each kind of client.

    Args:
        method: The function, taking the client first.
        like: The function whose parameters the method takes after the client.
        doc: The method's documentation, if not ``like``'s.
    """

    def __init__(
        self, method: Callable[..., Any], like: Callable[..., Any], doc: str | None = None
    ) -> None:
        self._method = method
        self._like = like
        self._doc = doc

    def __set_name__(self, owner: type[Any], name: str) -> None:
        signature = inspect.signature(self._like)
        client = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        self._method.__name__ = name
        self._method.__qualname__ = f"{owner.__qualname__}.{name}"
        self._method.__doc__ = self._doc or self._like.__doc__
        self._method.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[client, *signature.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )

    def _bound(self, client: object) -> Any:
        """The function itself (on the class), or the method bound to a client."""
        return self._method if client is None else types.MethodType(self._method, client)


class DrivenMethod(ClientMethod, Generic[P, T]):
    """A client method whose call is carried out by the client's driver.

    Called, it builds a call of its arguments (``build``), turns it into steps for the
    client (``steps_of``) and carries them out (``_run``): a ``BlockingDriver`` client
    returns the result, an ``AsyncDriver`` client a coroutine of it, as the types say.

    Args:
        build: Makes the call of the method's arguments; gives the method its
            signature and documentation.
        steps_of: The steps of a call for a client.
    """

    def __init__(self, build: Callable[P, C], steps_of: Callable[[Any, C], Steps[T]]) -> None:
        def method(client: Any, /, *args: P.args, **kwargs: P.kwargs) -> Any:
            return client._run(steps_of(client, build(*args, **kwargs)))

        super().__init__(method, build)

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Callable[..., Any]: ...

    @overload
    def __get__(self, client: BlockingDriver, owner: type[Any] | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(
        self, client: AsyncDriver, owner: type[Any] | None = None
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, client: object, owner: type[Any] | None = None) -> Any:
        return self._bound(client)
