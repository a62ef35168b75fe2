"""The httpx adapters (Client, and AsyncClient under asyncio and trio) against the loopback fake.

Every README guarantee that a user of ``httpx`` relies on: laziness, one token for many
requests and tasks, one retry on 401 (never for a streamed body, never twice), the storm cap,
origin pinning across redirects, API-key mode, and an event loop that never blocks.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest
import requests
import trio
from conftest import API_KEY, Clock, LeakWatch, MakeAuth, finish_renewal
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuth, EdrvAuthError

pytestmark = pytest.mark.timeout(30)


# ---- Fixtures and helpers ---------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every `anyio`-marked test under asyncio and under trio."""
    return str(request.param)


@pytest.fixture
def client(make_auth: MakeAuth) -> Iterator[httpx.Client]:
    """An httpx.Client authenticated by a fresh EdrvAuth pointed at the fake."""
    with httpx.Client(auth=make_auth(), timeout=10) as c:
        yield c


def _auth_of(client: httpx.Client | httpx.AsyncClient) -> EdrvAuth:
    auth = client.auth
    assert isinstance(auth, EdrvAuth)
    return auth


class _ThreadGate:
    """An httpx request hook that holds every send carrying ``token`` until ``count`` threads do.

    The hook runs after the auth flow has set the header and before the request is sent, so
    once the gate opens, all ``count`` requests have gone out with the same token: none can
    have seen a refreshed token, because a refresh needs a 401, which needs a send.
    """

    def __init__(self, token: str, count: int) -> None:
        self.header = f"Bearer {token}"
        self.barrier = threading.Barrier(count, timeout=10)

    def __call__(self, request: httpx.Request) -> None:
        if request.headers.get("Authorization") == self.header:
            self.barrier.wait()


class _TaskGate:
    """The async twin of `_ThreadGate`, for tasks of one event loop (asyncio or trio)."""

    def __init__(self, token: str, count: int) -> None:
        self.header = f"Bearer {token}"
        self.count = count
        self.waiting = 0
        self.open = anyio.Event()

    async def __call__(self, request: httpx.Request) -> None:
        if request.headers.get("Authorization") == self.header:
            self.waiting += 1
            if self.waiting == self.count:
                self.open.set()
            with anyio.fail_after(10):
                await self.open.wait()


async def _gather(count: int, call: Callable[[], Awaitable[httpx.Response]]) -> list[int]:
    """Run ``call`` in ``count`` concurrent tasks; return the status codes."""
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await call()).status_code)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)
    return statuses


def _body_chunks(body: bytes) -> Iterator[bytes]:
    """A generator body: httpx streams it and cannot send it twice."""
    for start in range(0, len(body), 4):
        yield body[start : start + 4]


async def _abody_chunks(body: bytes) -> AsyncIterator[bytes]:
    """An async generator body, the AsyncClient's non-replayable stream."""
    for start in range(0, len(body), 4):
        await anyio.sleep(0)
        yield body[start : start + 4]


async def _apost_resent_once(
    spoil: Callable[[], None], auth: EdrvAuth, fake: FakeEdrv, body: bytes
) -> httpx.Response:
    """One warm-up call with ``auth``, then ``spoil()`` and, counters reset, POST ``body``.

    The POST's answer is returned; it must come after exactly one 401 (one resend).
    """
    async with httpx.AsyncClient(auth=auth, timeout=10) as client:
        await client.get(f"{fake.url}/v1.1/warm")
        spoil()
        fake.reset_counters()
        response = await client.post(f"{fake.url}/v1.1/sessions", content=body)
    assert [r.status_code for r in response.history] == [401]
    return response


COUNTS_ZERO = {"token_requests": 0, "tokens_issued": 0, "api_requests": 0, "api_401s": 0}


# ---- httpx.Client -------------------------------------------------------------


def test_sync_construction_sends_and_writes_nothing(
    fake: FakeEdrv, make_auth: MakeAuth, clean_env: Path
) -> None:
    """Building an EdrvAuth and an httpx.Client with it makes no request and creates no file."""
    with httpx.Client(auth=make_auth()):
        pass
    assert fake.counts() == COUNTS_ZERO
    assert not clean_env.exists()


def test_sync_first_request_fetches_one_token_and_second_reuses_it(
    fake: FakeEdrv, client: httpx.Client
) -> None:
    """The first request makes one token request and sends its Bearer token; the next none."""
    first = client.get(f"{fake.url}/v1.1/chargestations")
    assert first.status_code == 200
    assert fake.token_requests == 1
    token = fake.issued_tokens[0]
    assert fake.api_auth_headers == [f"Bearer {token}"]

    second = client.get(f"{fake.url}/v1/sessions")
    assert second.status_code == 200
    assert fake.token_requests == 1
    assert fake.api_auth_headers == [f"Bearer {token}", f"Bearer {token}"]


def test_sync_401_resends_a_bytes_body_once_with_a_fresh_token(
    fake: FakeEdrv, client: httpx.Client
) -> None:
    """After a 401, a bytes body is re-sent once with one new token; the 401 is in history."""
    client.get(f"{fake.url}/v1.1/warm")
    old = _auth_of(client).get_token()
    fake.expire_all()
    fake.reset_counters()

    response = client.post(f"{fake.url}/v1.1/sessions", content=b"payload-bytes")

    assert response.status_code == 200
    assert fake.api_bodies == [b"payload-bytes", b"payload-bytes"]
    assert fake.token_requests == 1
    new = _auth_of(client).get_token()
    assert new != old
    assert fake.api_auth_headers == [f"Bearer {old}", f"Bearer {new}"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"json": {"station": "A1", "power": 22}}, id="json"),
        pytest.param({"data": {"station": "A1"}}, id="form"),
        pytest.param(
            {"files": {"upload": ("log.txt", b"in-memory bytes")}},
            id="multipart-bytes",
        ),
        pytest.param(
            {"files": {"upload": ("log.txt", io.BytesIO(b"a seekable file"))}},
            id="multipart-seekable-file",
        ),
    ],
)
def test_sync_401_resends_other_in_memory_bodies_once(
    fake: FakeEdrv, client: httpx.Client, body: dict[str, object]
) -> None:
    """json=, data= and multipart bodies held in memory are replayable: 401, then one resend."""
    client.get(f"{fake.url}/v1.1/warm")
    fake.expire_all()
    fake.reset_counters()

    response = client.post(f"{fake.url}/v1.1/sessions", **body)  # type: ignore[arg-type]

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake.token_requests == 1
    assert len(fake.api_bodies) == 2
    assert fake.api_bodies[0] == fake.api_bodies[1] != b""


def test_sync_401_that_a_fresh_token_does_not_cure_is_returned_after_one_resend(
    fake: FakeEdrv, client: httpx.Client
) -> None:
    """When the fresh token is rejected too, the caller gets that 401: no second retry."""
    client.get(f"{fake.url}/v1.1/warm")
    fake.reject_all = True
    fake.reset_counters()

    response = client.post(f"{fake.url}/v1.1/sessions", content=b"x")

    assert response.status_code == 401
    assert [r.status_code for r in response.history] == [401]
    assert fake.api_requests == 2
    assert fake.token_requests == 1


def test_sync_generator_body_is_not_replayed(fake: FakeEdrv, client: httpx.Client) -> None:
    """A generator body rejected with 401 is sent once and the caller gets the 401."""
    client.get(f"{fake.url}/v1.1/warm")
    fake.expire_all()
    fake.reset_counters()
    body = b"streamed-body-that-cannot-be-replayed"

    response = client.post(f"{fake.url}/v1.1/upload", content=_body_chunks(body))

    assert response.status_code == 401
    assert response.history == []
    assert fake.api_bodies == [body]
    assert fake.api_requests == 1
    assert fake.token_requests == 1  # the rejected token is replaced all the same
    assert client.post(f"{fake.url}/v1.1/upload", content=_body_chunks(body)).status_code == 200


class _ReadOnlyFile:
    """A file-like object that can be read once and not rewound (a pipe, a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data


def test_sync_multipart_with_unseekable_file_is_not_replayed(
    fake: FakeEdrv, client: httpx.Client
) -> None:
    """A multipart upload whose file cannot be rewound is sent once; the caller gets the 401."""
    client.get(f"{fake.url}/v1.1/warm")
    fake.expire_all()
    fake.reset_counters()
    files = {"upload": ("log.txt", _ReadOnlyFile(b"read-once"))}

    response = client.post(f"{fake.url}/v1.1/upload", files=files)  # type: ignore[dict-item]

    assert response.status_code == 401
    assert response.history == []
    assert fake.api_requests == 1
    assert b"read-once" in fake.api_bodies[0]


def test_sync_16_threads_rejected_with_one_token_make_one_token_request(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """16 threads sharing a Client, all rejected with the same token, cause one token request."""
    auth = make_auth()
    old = auth.get_token()
    fake.expire_all()
    fake.reset_counters()
    gate = _ThreadGate(old, 16)

    with (
        httpx.Client(auth=auth, timeout=10, event_hooks={"request": [gate]}) as client,
        ThreadPoolExecutor(max_workers=16) as pool,
    ):
        futures = [pool.submit(client.get, f"{fake.url}/v1.1/x/{i}") for i in range(16)]
        statuses = [f.result().status_code for f in futures]

    assert statuses == [200] * 16
    assert fake.api_401s == 16  # every one of them was rejected with the same token ...
    assert fake.token_requests == 1  # ... and together they made one token request
    assert fake.api_requests == 32


def test_sync_storm_cap_limits_token_requests_to_5(fake: FakeEdrv, client: httpx.Client) -> None:
    """With every token rejected, 30 requests make exactly 5 token requests and all get 401."""
    fake.reject_all = True

    statuses = [client.get(f"{fake.url}/v1.1/x").status_code for _ in range(30)]

    assert statuses == [401] * 30
    assert fake.token_requests == 5
    # Requests 1-4 are re-sent with a new token each; from the 5th on, the cap keeps the
    # current token and the 401 is returned without a resend.
    assert fake.api_requests == 4 * 2 + 26


@pytest.mark.parametrize("mode", ["token", "api_key"])
def test_sync_request_to_another_origin_is_refused_before_sending(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch, mode: str
) -> None:
    """A request to another origin raises EdrvAuthError; neither server receives anything."""
    auth = (
        make_auth()
        if mode == "token"
        else make_auth(client_id=None, client_secret=None, api_key=API_KEY)
    )
    with httpx.Client(auth=auth, timeout=10) as client, pytest.raises(EdrvAuthError) as caught:
        client.get(f"{other.url}/v1.1/x")
    assert other.counts() == COUNTS_ZERO
    assert fake.counts() == COUNTS_ZERO
    assert leak_watch.leaks(str(caught.value), repr(caught.value)) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:1/v1.1/x",  # another host
        "https://example.invalid/v1.1/x",  # another host and scheme
        "http://localhost:{port}/v1.1/x",  # the same server, spelled as another origin
        "https://127.0.0.1:{port}/v1.1/x",  # same host and port, another scheme
    ],
)
def test_sync_unreachable_foreign_origins_raise_edrv_auth_error(
    fake: FakeEdrv, client: httpx.Client, url: str
) -> None:
    """Foreign origins raise EdrvAuthError, not a connection error: no connection is tried."""
    with pytest.raises(EdrvAuthError, match="refusing to send the eDRV token"):
        client.get(url.format(port=fake.url.rsplit(":", 1)[1]))
    assert fake.counts() == COUNTS_ZERO


def test_sync_same_origin_redirect_keeps_auth_and_retries_the_chain(
    fake: FakeEdrv, client: httpx.Client
) -> None:
    """A same-origin redirect keeps the token, and a 401 after it is retried with a new one."""
    url = f"{fake.url}/redirect?to={fake.url}/v1.1/target"
    first = client.get(url, follow_redirects=True)
    assert first.status_code == 200
    assert [r.status_code for r in first.history] == [302]
    token = _auth_of(client).get_token()
    assert fake.api_auth_headers == [f"Bearer {token}"]
    assert fake.token_requests == 1

    fake.expire_all()
    second = client.get(url, follow_redirects=True)
    assert second.status_code == 200
    assert fake.token_requests == 2
    fresh = _auth_of(client).get_token()
    assert fake.api_auth_headers == [f"Bearer {token}", f"Bearer {token}", f"Bearer {fresh}"]


def test_sync_redirect_to_another_origin_never_carries_the_token(
    fake: FakeEdrv, other: FakeEdrv, client: httpx.Client
) -> None:
    """A redirect to another origin arrives there without the token; its 401 causes no refresh."""
    response = client.get(
        f"{fake.url}/redirect?to={other.url}/v1.1/elsewhere", follow_redirects=True
    )
    assert response.status_code == 401  # the other origin's answer, returned as is
    assert str(response.request.url).startswith(other.url)
    assert other.api_auth_headers == [None]
    assert other.token_requests == 0
    assert fake.token_requests == 1  # the one for the first hop; the foreign 401 adds none


def _bounce_url(fake: FakeEdrv, other: FakeEdrv) -> str:
    """API origin -> other origin -> back to the API: httpx drops the token on the way out."""
    back = f"{fake.url}/v1.1/bounced"
    via = f"{other.url}/redirect?to={urllib.parse.quote(back, safe='')}"
    return f"{fake.url}/redirect?to={urllib.parse.quote(via, safe='')}"


def test_sync_401_to_a_request_that_lost_the_token_in_a_redirect_is_not_retried(
    fake: FakeEdrv, other: FakeEdrv, client: httpx.Client
) -> None:
    """A 401 to a request that came back from another origin without the token costs no token."""
    client.get(f"{fake.url}/v1.1/warm")
    token = _auth_of(client).get_token()
    fake.reset_counters()

    response = client.get(_bounce_url(fake, other), follow_redirects=True)

    assert response.status_code == 401
    assert fake.api_auth_headers == [None]  # it arrived without the token: not our 401
    assert fake.token_requests == 0
    assert _auth_of(client).get_token() == token  # the valid token is kept


def test_sync_api_key_mode_sends_the_key_and_never_requests_a_token(
    fake: FakeEdrv, make_auth: MakeAuth, clean_env: Path, leak_watch: LeakWatch
) -> None:
    """In API-key mode every request carries Bearer <key>: no token request, no cache file."""
    key = fake.issue_token()
    leak_watch.secrets.add(key)
    auth = make_auth(client_id=None, client_secret=None, api_key=key)
    with httpx.Client(auth=auth, timeout=10) as client:
        statuses = [client.get(f"{fake.url}/v1.1/x/{i}").status_code for i in range(3)]
    assert statuses == [200] * 3
    assert fake.api_auth_headers == [f"Bearer {key}"] * 3
    assert fake.token_requests == 0
    assert not clean_env.exists()


def test_sync_api_key_401_is_not_retried(
    fake: FakeEdrv, make_auth: MakeAuth, clean_env: Path
) -> None:
    """In API-key mode a 401 goes straight to the caller: one API request, no token request."""
    auth = make_auth(client_id=None, client_secret=None, api_key=API_KEY)
    with httpx.Client(auth=auth, timeout=10) as client:
        response = client.post(f"{fake.url}/v1.1/x", content=b"body")
    assert response.status_code == 401
    assert response.history == []
    assert fake.api_requests == 1
    assert fake.api_auth_headers == [f"Bearer {API_KEY}"]
    assert fake.token_requests == 0
    assert not clean_env.exists()


def test_requests_session_and_httpx_client_share_one_token(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A requests.Session and an httpx.Client with two EdrvAuth on one cache share one token."""
    fake.token_delay = 0.2  # both start on a cold cache while the first token is in flight
    auth_requests, auth_httpx = make_auth(), make_auth()
    start = threading.Barrier(2, timeout=10)

    def with_requests() -> int:
        with requests.Session() as session:
            start.wait()
            return session.get(f"{fake.url}/v1.1/r", auth=auth_requests, timeout=10).status_code

    def with_httpx() -> int:
        with httpx.Client(auth=auth_httpx, timeout=10) as client:
            start.wait()
            return client.get(f"{fake.url}/v1.1/h").status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(with_requests), pool.submit(with_httpx)]
        statuses = [f.result() for f in futures]

    assert statuses == [200, 200]
    assert fake.token_requests == 1
    assert auth_requests.get_token() == auth_httpx.get_token()
    assert fake.api_auth_headers == [f"Bearer {auth_httpx.get_token()}"] * 2


# ---- The hot path at and past the refresh time; a 403 is not a 401 ------------

CLIENTS = ["requests", "httpx", "httpx-async"]


def _get(kind: str, auth: EdrvAuth, url: str) -> httpx.Response | requests.Response:
    """One GET through the named client, as a user would send it."""
    if kind == "requests":
        return requests.get(url, auth=auth, timeout=10)
    if kind == "httpx":
        with httpx.Client(auth=auth, timeout=10) as sync_client:
            return sync_client.get(url)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth, timeout=10) as async_client:
            return await async_client.get(url)

    return asyncio.run(send())


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("when", ["at", "past"])
def test_request_at_or_past_refresh_time_is_sent_at_once_while_the_token_is_renewed(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock, kind: str, when: str
) -> None:
    """From refresh_at on, a token that outlives its renewal is still sent, unretried, while a
    renewal runs in the background; the next request carries the new token."""
    auth = make_auth()
    old = auth.get_token()
    assert auth._describe().published is not None
    refresh_at = auth._describe().published.serve_until
    clock.now = refresh_at if when == "at" else refresh_at + 150  # half the 300 s margin
    response = _get(kind, auth, f"{fake.url}/v1.1/x")
    assert (response.status_code, len(response.history)) == (200, 0)
    finish_renewal(auth)
    assert fake.token_requests == 2
    new = auth.get_token()
    assert new != old
    assert _get(kind, auth, f"{fake.url}/v1.1/x").status_code == 200
    assert fake.api_auth_headers == [f"Bearer {old}", f"Bearer {new}"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_request_within_timeout_of_expiry_is_sent_with_a_new_token(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock, kind: str
) -> None:
    """A token closer to its expiry than one token request may take (timeout) could die
    before a background renewal ends: the request waits for the new token."""
    auth = make_auth(timeout=10)
    old = auth.get_token()
    clock.advance(fake.expires_in - 9.5)  # 9.5 s left
    response = _get(kind, auth, f"{fake.url}/v1.1/x")
    assert (response.status_code, len(response.history)) == (200, 0)
    assert fake.token_requests == 2
    assert auth._describe().renewal is None  # no thread: the caller renewed it
    assert fake.api_auth_headers == [f"Bearer {auth.get_token()}"] != [f"Bearer {old}"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_403_is_returned_without_a_retry_or_a_token_request(
    fake: FakeEdrv, make_auth: MakeAuth, kind: str
) -> None:
    """A 403 (forbidden, not expired) reaches the caller as is: no resend, no token request."""
    auth = make_auth()
    token = auth.get_token()
    fake.queue_api_response(403, {"ok": False, "message": "forbidden", "result": None})
    response = _get(kind, auth, f"{fake.url}/v1.1/x")
    assert (response.status_code, len(response.history)) == (403, 0)
    assert fake.api_auth_headers == [f"Bearer {token}"]
    assert fake.token_requests == 1


# ---- httpx.AsyncClient, under asyncio and trio --------------------------------


@pytest.mark.anyio
async def test_async_construction_sends_and_writes_nothing(
    fake: FakeEdrv, make_auth: MakeAuth, clean_env: Path
) -> None:
    """Building an EdrvAuth and an httpx.AsyncClient with it makes no request and no file."""
    async with httpx.AsyncClient(auth=make_auth()):
        pass
    assert fake.counts() == COUNTS_ZERO
    assert not clean_env.exists()


@pytest.mark.anyio
async def test_async_first_request_fetches_one_token_and_second_reuses_it(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """The first async request makes one token request and sends its token; the next none."""
    async with httpx.AsyncClient(auth=make_auth(), timeout=10) as client:
        first = await client.get(f"{fake.url}/v1.1/chargestations")
        assert first.status_code == 200
        assert fake.token_requests == 1
        token = fake.issued_tokens[0]
        assert fake.api_auth_headers == [f"Bearer {token}"]

        second = await client.get(f"{fake.url}/v1/sessions")
        assert second.status_code == 200
        assert fake.token_requests == 1
        assert fake.api_auth_headers == [f"Bearer {token}", f"Bearer {token}"]


@pytest.mark.anyio
async def test_async_401_resends_a_bytes_body_once_with_a_fresh_token(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """After a 401, the AsyncClient re-sends a bytes body once with one new token."""
    auth = make_auth()
    old = auth.get_token()
    response = await _apost_resent_once(fake.expire_all, auth, fake, b"payload-bytes")
    assert response.status_code == 200
    assert fake.api_bodies == [b"payload-bytes", b"payload-bytes"]
    assert fake.token_requests == 1
    assert fake.api_auth_headers == [f"Bearer {old}", f"Bearer {auth.get_token()}"]


@pytest.mark.anyio
async def test_async_401_that_a_fresh_token_does_not_cure_is_returned_after_one_resend(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """When the fresh token is rejected too, the async caller gets that 401: no second retry."""

    def reject_all() -> None:
        fake.reject_all = True

    response = await _apost_resent_once(reject_all, make_auth(), fake, b"x")
    assert response.status_code == 401
    assert fake.api_requests == 2
    assert fake.token_requests == 1


@pytest.mark.anyio
async def test_async_generator_body_is_not_replayed(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """An async generator body rejected with 401 is sent once and the caller gets the 401."""
    body = b"async-streamed-body-that-cannot-be-replayed"
    async with httpx.AsyncClient(auth=make_auth(), timeout=10) as client:
        await client.get(f"{fake.url}/v1.1/warm")
        fake.expire_all()
        fake.reset_counters()
        response = await client.post(f"{fake.url}/v1.1/upload", content=_abody_chunks(body))
        again = await client.post(f"{fake.url}/v1.1/upload", content=_abody_chunks(body))

    assert response.status_code == 401
    assert response.history == []
    assert again.status_code == 200  # the rejected token was replaced all the same
    assert fake.api_bodies == [body, body]
    assert (fake.api_requests, fake.token_requests) == (2, 1)


@pytest.mark.anyio
async def test_async_100_tasks_on_a_cold_cache_make_one_token_request(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """100 concurrent tasks on a cold cache share one token request."""
    fake.token_delay = 0.1  # keep the first request in flight while the others arrive
    async with httpx.AsyncClient(auth=make_auth(), timeout=10) as client:
        statuses = await _gather(100, lambda: client.get(f"{fake.url}/v1.1/x"))
    assert statuses == [200] * 100
    assert fake.token_requests == 1
    assert fake.api_requests == 100


@pytest.mark.anyio
async def test_async_100_tasks_rejected_with_one_token_make_one_token_request(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """100 tasks all rejected with the same token cause exactly one more token request."""
    auth = make_auth()
    old = await auth.aget_token()
    fake.expire_all()
    fake.reset_counters()
    gate = _TaskGate(old, 100)
    async with httpx.AsyncClient(auth=auth, timeout=10, event_hooks={"request": [gate]}) as client:
        statuses = await _gather(100, lambda: client.get(f"{fake.url}/v1.1/x"))
    assert statuses == [200] * 100
    assert fake.api_401s == 100  # all of them were rejected with the same token ...
    assert fake.token_requests == 1  # ... and together they made one token request
    assert fake.api_requests == 200


@pytest.mark.anyio
async def test_async_storm_cap_limits_token_requests_to_5(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """With every token rejected, 30 async requests make exactly 5 token requests, all 401."""
    fake.reject_all = True
    async with httpx.AsyncClient(auth=make_auth(), timeout=10) as client:
        statuses = [(await client.get(f"{fake.url}/v1.1/x")).status_code for _ in range(30)]
    assert statuses == [401] * 30
    assert fake.token_requests == 5
    assert fake.api_requests == 4 * 2 + 26


@pytest.mark.anyio
async def test_async_request_to_another_origin_is_refused_before_sending(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """An async request to another origin raises EdrvAuthError and reaches no server."""
    async with httpx.AsyncClient(auth=make_auth(), timeout=10) as client:
        with pytest.raises(EdrvAuthError) as caught:
            await client.get(f"{other.url}/v1.1/x")
        with pytest.raises(EdrvAuthError):
            await client.get("https://example.invalid/v1.1/x")
    assert other.counts() == COUNTS_ZERO
    assert fake.counts() == COUNTS_ZERO
    assert leak_watch.leaks(str(caught.value)) == []


@pytest.mark.anyio
async def test_async_redirects_keep_the_token_on_the_origin_only(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A same-origin redirect keeps the token; one to another origin arrives there without it."""
    auth = make_auth()
    async with httpx.AsyncClient(auth=auth, timeout=10, follow_redirects=True) as client:
        same = await client.get(f"{fake.url}/redirect?to={fake.url}/v1.1/target")
        foreign = await client.get(f"{fake.url}/redirect?to={other.url}/v1.1/elsewhere")
    assert same.status_code == 200
    assert fake.api_auth_headers == [f"Bearer {auth.get_token()}"]
    assert foreign.status_code == 401
    assert other.api_auth_headers == [None]
    assert other.token_requests == 0
    assert fake.token_requests == 1


@pytest.mark.anyio
async def test_async_401_to_a_request_that_lost_the_token_in_a_redirect_is_not_retried(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth
) -> None:
    """Async: a 401 to a request that came back without the token costs no token request."""
    auth = make_auth()
    token = await auth.aget_token()
    async with httpx.AsyncClient(auth=auth, timeout=10, follow_redirects=True) as client:
        response = await client.get(_bounce_url(fake, other))
    assert response.status_code == 401
    assert fake.api_auth_headers == [None]
    assert fake.token_requests == 1
    assert auth.get_token() == token


@pytest.mark.anyio
async def test_async_api_key_mode_sends_the_key_and_never_retries(
    fake: FakeEdrv, make_auth: MakeAuth, clean_env: Path, leak_watch: LeakWatch
) -> None:
    """Async API-key mode sends Bearer <key>, requests no token, writes no file, retries no 401."""
    key = fake.issue_token()
    leak_watch.secrets.add(key)
    good = make_auth(client_id=None, client_secret=None, api_key=key)
    bad = make_auth(client_id=None, client_secret=None, api_key=API_KEY)
    async with httpx.AsyncClient(auth=good, timeout=10) as client:
        ok = await client.get(f"{fake.url}/v1.1/x")
        rejected = await client.post(f"{fake.url}/v1.1/x", content=b"body", auth=bad)
    assert ok.status_code == 200
    assert rejected.status_code == 401
    assert rejected.history == []
    assert fake.api_auth_headers == [f"Bearer {key}", f"Bearer {API_KEY}"]
    assert fake.token_requests == 0
    assert not clean_env.exists()
    assert await good.aget_token() == key


class _TimeInModule:
    """A profile function: how long its thread runs inside edrv_auth, stretch by stretch.

    A stretch starts when the thread enters an edrv_auth frame from outside the
    module and ends when it leaves the outermost one: a call that returns, or a
    coroutine or async generator of the module that suspends (``await``, ``yield``).
    Whatever edrv_auth calls meanwhile (a lock, a file, the network) counts. Installed
    with ``sys.setprofile`` on the event loop's thread, it measures exactly what the
    module makes the loop wait for, and nothing of what the rest of the machine does.
    """

    def __init__(self) -> None:
        self.stretches: list[float] = []
        self._depth = 0
        self._start = 0.0

    def __call__(self, frame: types.FrameType, event: str, arg: object) -> None:
        if event not in ("call", "return") or frame.f_code.co_filename != MODULE_FILE:
            return
        if event == "call":
            if self._depth == 0:
                self._start = time.perf_counter()
            self._depth += 1
        elif self._depth > 0:  # not a frame that was already running when profiling began
            self._depth -= 1
            if self._depth == 0:
                self.stretches.append(time.perf_counter() - self._start)


MODULE_FILE = edrv_auth.__file__


@pytest.mark.anyio
async def test_async_slow_token_request_does_not_block_the_event_loop(
    fake: FakeEdrv, make_auth: MakeAuth, anyio_backend: str
) -> None:
    """While a 0.5 s token request serves 100 tasks, the loop never waits inside edrv_auth.

    The loop thread's time inside edrv_auth is measured stretch by stretch (see
    `_TimeInModule`); a token request, a lock or a file read made on the loop thread would
    be one stretch of 0.5 s or more. Timing a heartbeat instead measured the machine: on a
    loaded 2-core runner its ticks came late (55 ms) with edrv_auth nowhere on the loop.
    """
    fake.token_delay = 0.5
    auth = make_auth()
    profile = _TimeInModule()
    async with httpx.AsyncClient(auth=auth, timeout=10) as client:
        sys.setprofile(profile)
        try:
            statuses = await _gather(100, lambda: client.get(f"{fake.url}/v1.1/x"))
        finally:
            sys.setprofile(None)
    longest, total = max(profile.stretches), sum(profile.stretches)
    print(
        f"\n[{anyio_backend}] loop thread inside edrv_auth: {len(profile.stretches)} stretches, "
        f"longest {longest * 1000:.1f} ms, {total * 1000:.1f} ms in all"
    )
    assert statuses == [200] * 100
    assert fake.token_requests == 1
    assert len(profile.stretches) >= 200  # each task's flow ran on the loop, and was measured
    assert longest < 0.25  # a token request on the loop thread takes >= 0.5 s here


@pytest.mark.anyio
async def test_async_cancelled_leader_leaves_no_waiter_hanging(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """Cancelling the task whose token request is in flight leaves the waiting tasks served."""
    fake.token_delay = 0.5
    auth = make_auth()
    leader_scope = anyio.CancelScope()
    statuses: list[int] = []
    tokens: list[str] = []

    async with httpx.AsyncClient(auth=auth, timeout=10) as client:

        async def leader() -> None:
            with leader_scope:
                await client.get(f"{fake.url}/v1.1/leader")

        async def waiter() -> None:
            statuses.append((await client.get(f"{fake.url}/v1.1/waiter")).status_code)
            tokens.append(await auth.aget_token())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(leader)
                while fake.token_requests == 0:  # the leader's token request is in flight
                    await anyio.sleep(0.005)
                for _ in range(5):
                    group.start_soon(waiter)
                await anyio.sleep(0.05)  # the waiters join the in-flight job
                leader_scope.cancel()

    assert leader_scope.cancelled_caught  # the leader really was cancelled mid-request
    assert statuses == [200] * 5
    assert fake.token_requests == 1
    assert tokens == [auth.get_token()] * 5
    assert all(tokens)


@pytest.mark.anyio
async def test_aget_token_equals_get_token_without_another_request(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """aget_token() and get_token() return the same token from one token request, either order."""
    first = make_auth()
    assert await first.aget_token() == first.get_token()
    second = make_auth()
    assert second.get_token() == await second.aget_token() == first.get_token()
    assert fake.token_requests == 1


# ---- Event loops that come and go -----------------------------------------------


def _run_asyncio(func: Callable[[], Awaitable[object]]) -> None:
    async def main() -> None:
        await func()

    asyncio.run(main())


def _run_trio(func: Callable[[], Awaitable[object]]) -> None:
    trio.run(func)


@pytest.mark.parametrize(
    "runners",
    [(_run_asyncio, _run_asyncio), (_run_trio, _run_trio), (_run_asyncio, _run_trio)],
    ids=["asyncio-asyncio", "trio-trio", "asyncio-trio"],
)
def test_one_instance_serves_successive_event_loops(
    fake: FakeEdrv,
    make_auth: MakeAuth,
    runners: tuple[Callable[..., None], Callable[..., None]],
) -> None:
    """One EdrvAuth keeps working in a new event loop: cold cache, then a 401, in each loop."""
    auth = make_auth()
    statuses: list[int] = []

    async def burst() -> None:
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            statuses.extend(await _gather(10, lambda: client.get(f"{fake.url}/v1.1/x")))

    for run in runners:
        auth.clear()  # a cold start: the in-flight job table is used again in this loop
        run(burst)
        fake.expire_all()  # the next burst starts with a 401 and a shared refresh
        run(burst)

    assert statuses == [200] * 40
    assert fake.token_requests == 4
    assert fake.api_401s == 20


def test_asyncio_task_cancel_of_the_leader_leaves_no_waiter_hanging(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """asyncio Task.cancel() on the task leading the token request still serves its waiters."""
    fake.token_delay = 0.5
    auth = make_auth()

    async def main() -> list[str]:
        leader = asyncio.create_task(auth.aget_token())
        while fake.token_requests == 0:
            await asyncio.sleep(0.005)
        waiters = [asyncio.create_task(auth.aget_token()) for _ in range(5)]
        await asyncio.sleep(0.05)
        leader.cancel()
        tokens = await asyncio.wait_for(asyncio.gather(*waiters), timeout=10)
        await asyncio.gather(leader, return_exceptions=True)
        assert leader.cancelled()
        return tokens

    tokens = asyncio.run(main())
    assert tokens == [auth.get_token()] * 5
    assert all(tokens)
    assert fake.token_requests == 1
