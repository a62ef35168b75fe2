"""Edge cases found by reviewing the module against its guarantees, each once a defect."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from conftest import CLIENT_ID, Clock, LeakWatch
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError

MakeAuth = Callable[..., EdrvAuth]


@pytest.mark.parametrize("code", [302, 303])
def test_redirect_that_drops_the_body_then_401_is_retried(
    fake: FakeEdrv, make_auth: MakeAuth, code: int
) -> None:
    """A file body POSTed into a 302/303 (which becomes a GET) then a 401: one clean retry."""
    auth = make_auth()
    auth.get_token()
    fake.expire_all()
    target = f"{fake.url}/v1.1/x"
    response = requests.post(
        f"{fake.url}/redirect",
        params={"to": target, "code": str(code)},
        data=io.BytesIO(b"payload"),
        auth=auth,
        timeout=5,
    )
    assert response.status_code == 200
    assert fake.token_requests == 2


def test_no_second_retry_after_a_redirect(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """401, retry, 302, then 401 again: the caller gets that 401; no second retry."""
    auth = make_auth()
    auth.get_token()
    fake.queue_api_response(401, {"ok": False, "message": "jwt expired", "result": None})
    fake.queue_api_response(302, "", {"Location": f"{fake.url}/v1.1/b"})
    fake.queue_api_response(401, {"ok": False, "message": "jwt expired", "result": None})
    fake.expire_all()
    response = requests.get(f"{fake.url}/v1.1/a", auth=auth, timeout=5)
    assert response.status_code == 401
    assert fake.api_requests == 3
    assert fake.token_requests == 2
    # The redirect carried the new token, not the one already rejected.
    assert fake.api_auth_headers[2] == f"Bearer {auth.get_token()}"


def test_lifetime_equal_to_margin_is_not_stale_at_birth(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A token living exactly refresh_margin seconds is used for half its life, not refetched."""
    fake.expires_in = 300
    auth = make_auth(refresh_margin=300)
    tokens = {auth.get_token() for _ in range(20)}
    assert (len(tokens), fake.token_requests) == (1, 1)
    clock.advance(151)
    auth.get_token()
    assert fake.token_requests == 2


@pytest.fixture
def drip_server() -> Iterator[str]:
    """A token endpoint that sends its answer one byte every 0.2 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                body = b'{"access_token": "drip-' + b"x" * 200 + b'", "expires_in": 60}'
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                conn.sendall(head)
                for byte in body:
                    if stop.wait(0.2):
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/oauth/token"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_timeout_bounds_the_whole_answer(
    drip_server: str, make_auth: MakeAuth, no_sleep: list[float]
) -> None:
    """A server dripping its answer cannot stretch one attempt past `timeout`."""
    auth = make_auth(token_url=drip_server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TokenRequestError, match="timed out"):
        auth.get_token()
    assert time.monotonic() - started < 4  # 3 attempts of ~0.5 s, not 3 x 40 s


def test_timeout_longer_than_the_lock_wait_is_refused() -> None:
    """A token request must end before other processes stop waiting for the lock."""
    with pytest.raises(EdrvAuthError, match="timeout"):
        EdrvAuth(CLIENT_ID, "test-secret", timeout=60)


def test_url_encoded_secret_never_reaches_a_message(
    fake: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """A proxy echoing the form (secret URL-encoded) does not put it in the error."""
    secret = "test/secret+canary=9"
    leak_watch.secrets.update({secret, "test%2Fsecret%2Bcanary%3D9"})
    fake.queue_token_response(
        400,
        {
            "error": "invalid_request",
            "error_description": "bad body: client_secret=test%2Fsecret%2Bcanary%3D9",
        },
    )
    with pytest.raises(TokenRequestError) as caught:
        make_auth(client_secret=secret).get_token()
    assert "client_secret=***" in str(caught.value)
    assert leak_watch.leaks(str(caught.value)) == []


def test_clear_during_a_token_request_leaves_memory_and_disk_agreeing(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """clear() waits for an in-flight token request, then forgets it everywhere."""
    fake.token_delay = 0.6
    auth = make_auth()
    fetcher = threading.Thread(target=auth.get_token)
    fetcher.start()
    while fake.token_requests == 0:
        time.sleep(0.01)
    auth.clear()
    fetcher.join()
    state = auth._describe().file_cache.read()
    assert auth._describe().published is None
    assert state is None or state.token is None


@pytest.mark.parametrize("body", [bytearray(b"payload"), memoryview(b"payload")])
def test_bytearray_and_memoryview_bodies_are_replayed(
    fake: FakeEdrv, make_auth: MakeAuth, body: object
) -> None:
    """In-memory bodies of any bytes-like type are re-sent once after a 401."""
    auth = make_auth()
    auth.get_token()
    fake.expire_all()
    response = requests.post(f"{fake.url}/v1.1/x", data=body, auth=auth, timeout=5)
    assert response.status_code == 200
    assert fake.api_bodies == [b"payload", b"payload"]


def test_explicit_default_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passing the default URL explicitly is an explicit argument: the variable loses."""
    monkeypatch.setenv("EDRV_API_URL", "http://127.0.0.1:9")
    explicit = "".join(["https://", "api.edrv.io"])  # equal to the default, another object
    assert EdrvAuth(CLIENT_ID, "test-secret", api_url=explicit)._describe().api_url == explicit
    assert EdrvAuth(CLIENT_ID, "test-secret")._describe().api_url == "http://127.0.0.1:9"


def test_invalid_redis_port_is_refused_at_construction() -> None:
    """A redis_url redis-py cannot parse fails at construction, not at every request."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    with pytest.raises(EdrvAuthError, match="invalid port"):
        EdrvAuth(CLIENT_ID, "test-secret", redis_url="redis://127.0.0.1:notaport/0")


@pytest.mark.needs_redis
def test_cap_record_is_mirrored_to_the_file(
    fake: FakeEdrv, make_auth: MakeAuth, tmp_path: Path, clean_env: Path
) -> None:
    """What the Redis store holds is copied to the file, so a fallback keeps the cap's count."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from redis_server import RedisServer

    try:
        server = RedisServer().start()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    fake.reject_all = True
    try:
        auth = make_auth(redis_url=server.url)
        with requests.Session() as session:
            for _ in range(6):
                session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
        assert fake.token_requests == 5
        server.stop()
        fallback = make_auth(redis_url=server.url)
        with requests.Session() as session:
            for _ in range(6):
                session.get(f"{fake.url}/v1.1/x", auth=fallback, timeout=5)
    finally:
        server.stop()
    assert fake.token_requests == 5
    assert edrv_auth._parse_record(fallback._describe().file_cache.path.read_bytes()) is not None


def test_leftovers_of_a_killed_writer_are_removed(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """Old temporary files (a writer killed before its rename) go at the next write."""
    import os

    auth = make_auth()
    auth._describe().file_cache.ensure_dir()
    old = (
        auth._describe().file_cache.directory
        / f".{auth._describe().file_cache.path.name}.4242.deadbeef"
    )
    fresh = (
        auth._describe().file_cache.directory
        / f".{auth._describe().file_cache.path.name}.4243.cafebabe"
    )
    for leftover in (old, fresh):
        leftover.write_bytes(b"{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    auth.get_token()
    assert not old.exists()
    assert fresh.exists()  # may still belong to a writer at work


def test_request_times_slightly_in_the_future_still_count(clock: Clock) -> None:
    """Another machine's clock running ahead does not hide its token requests from the cap."""
    state = edrv_auth._CacheRecord(None, (clock.now + 10, clock.now + 20), None)
    assert len(state.counted_times(clock.now)) == 2
