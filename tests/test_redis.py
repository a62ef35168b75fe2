"""The Redis cache: one token for processes that share only a Redis URL.

Each process gets its own cache folder, as separate machines would. The tests
start a real `redis-server` on 127.0.0.1. Without the binary they skip on a
developer machine, but fail in CI (CI=true), where `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from conftest import CLIENT_ID, CLIENT_SECRET, ROOT, Clock, LeakWatch, MakeAuth, auth_maker
from fake_edrv import FakeEdrv
from redis_server import RedisServer, redis_data

import edrv_auth

pytestmark = pytest.mark.needs_redis

pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise  # CI installs redis-server: its absence is a failure there
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def machine(fake: FakeEdrv, redis_url: str, tmp_path: Path) -> MakeAuth:
    """An EdrvAuth as on its own machine: its own cache folder, the shared Redis."""
    count = iter(range(1000))
    shared = auth_maker(fake, redis_url=redis_url)

    def make(**overrides: object) -> edrv_auth.EdrvAuth:
        return shared(**{"cache_dir": tmp_path / f"machine-{next(count)}", **overrides})

    return make


CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import requests
    import edrv_auth
    edrv_auth._REDIS_LOCK_TTL = float(os.environ.get("TEST_LOCK_TTL", edrv_auth._REDIS_LOCK_TTL))
    go = Path(sys.argv[1])
    auth = edrv_auth.EdrvAuth()
    Path(sys.argv[2]).touch()
    while not go.exists():
        time.sleep(0.005)
    statuses = []
    url = os.environ["EDRV_API_URL"] + "/v1.1/x"
    def call():
        with requests.Session() as s:
            statuses.append(s.get(url, auth=auth, timeout=30).status_code)
    threads = [threading.Thread(target=call) for _ in range(int(sys.argv[3]))]
    for t in threads: t.start()
    for t in threads: t.join()
    print(" ".join(map(str, statuses)))
    """
)


def start_machines(
    tmp_path: Path, fake: FakeEdrv, redis_url: str, count: int, threads: int, **env: str
) -> list[subprocess.Popen[str]]:
    """Start `count` processes, each with its own cache folder, all waiting for `go`."""
    go = tmp_path / "go"
    children = []
    for i in range(count):
        child_env = dict(
            os.environ,
            **fake.environment(tmp_path / f"proc-{i}"),
            EDRV_AUTH_REDIS_URL=redis_url,
            **env,
        )
        ready = tmp_path / f"ready-{i}"
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(go), str(ready), str(threads)],
                cwd=ROOT,
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{i}").exists() for i in range(count)):
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.01)
    return children


def finish(children: list[subprocess.Popen[str]], leak_watch: LeakWatch) -> list[str]:
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            assert leak_watch.leaks(out, err) == []
            outputs.extend(out.split())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs


def test_cold_fleet_without_shared_disk_makes_one_token_request(
    fake: FakeEdrv, redis_url: str, tmp_path: Path, leak_watch: LeakWatch
) -> None:
    """6 processes x 3 threads with separate cache folders, started together: 1 token request."""
    fake.token_delay = 0.3
    children = start_machines(tmp_path, fake, redis_url, count=6, threads=3)
    (tmp_path / "go").touch()
    statuses = finish(children, leak_watch)
    assert statuses == ["200"] * 18
    assert fake.token_requests == 1


def test_a_new_machine_reuses_the_token_in_redis(fake: FakeEdrv, machine: MakeAuth) -> None:
    """A process with an empty cache folder takes the token from Redis: 0 token requests."""
    token = machine().get_token()
    assert machine().get_token() == token
    assert fake.token_requests == 1


def test_401_compare_and_swap_across_machines(fake: FakeEdrv, machine: MakeAuth) -> None:
    """A 401 with a token another machine already replaced adopts the new one from Redis."""
    first, second = machine(), machine()
    stale = first.get_token()
    assert second.get_token() == stale
    fake.expire_all()
    with requests.Session() as session:
        assert session.get(f"{fake.url}/v1.1/x", auth=first, timeout=5).status_code == 200
        assert session.get(f"{fake.url}/v1.1/x", auth=second, timeout=5).status_code == 200
    assert fake.token_requests == 2
    assert second.get_token() == first.get_token() != stale


def test_storm_cap_is_shared_through_redis(fake: FakeEdrv, machine: MakeAuth) -> None:
    """Machines sharing Redis share the 5-a-minute cap, though their disks differ."""
    fake.reject_all = True
    fleet = [machine() for _ in range(3)]
    with requests.Session() as session:
        for _ in range(4):
            for auth in fleet:
                assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 401
    assert fake.token_requests == 5


def test_redis_holds_the_token_but_no_secret(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """What is stored: a hashed key, the token and its times, with a TTL; no secret, no id."""
    auth = machine()
    token = auth.get_token()
    data = redis_data(redis_url)
    assert list(data) == [auth._describe().stores[0].key.encode()]  # type: ignore[attr-defined]
    stored = b" ".join([*data, *data.values()])
    assert CLIENT_SECRET.encode() not in stored
    assert CLIENT_ID.encode() not in stored
    assert json.loads(next(iter(data.values())))["token"]["access_token"] == token
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.pttl(next(iter(data)))
    finally:
        client.close()
    assert 86_000_000 < ttl <= 86_400_000  # ends with the token's life


def test_lock_is_released_after_a_token_request(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """The single-flight lock is gone once the token is saved (released by its owner)."""
    machine().get_token()
    assert [key for key in redis_data(redis_url) if key.endswith(b":lock")] == []


def test_holder_killed_mid_request_blocks_the_others_only_until_its_lock_expires(
    fake: FakeEdrv, redis_url: str, tmp_path: Path, leak_watch: LeakWatch,
    machine: MakeAuth, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """SIGKILL during a token request: the lock expires by itself, and the next process gets one."""
    fake.token_delay = 5
    (holder,) = start_machines(tmp_path, fake, redis_url, count=1, threads=1, TEST_LOCK_TTL="1.5")
    (tmp_path / "go").touch()
    try:
        deadline = time.monotonic() + 10
        while fake.token_requests == 0:
            assert time.monotonic() < deadline, "the holder never asked for a token"
            time.sleep(0.01)
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.communicate(timeout=30)
    fake.token_delay = 0
    monkeypatch.setattr(edrv_auth, "_REDIS_LOCK_TTL", 1.5)
    started = time.monotonic()
    token = machine().get_token()
    waited = time.monotonic() - started
    assert token in fake.issued_tokens
    assert waited < 5
    assert fake.token_requests == 2


def test_redis_down_falls_back_to_the_local_cache_with_one_warning(
    fake: FakeEdrv, tmp_path: Path, leak_watch: LeakWatch, redis_server: RedisServer
) -> None:
    """Stopping Redis mid-run fails no request; the fallback is logged once."""
    server = redis_server
    auth = auth_maker(fake, cache_dir=tmp_path / "local")(redis_url=server.url)
    try:
        with requests.Session() as session:
            assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200
            server.stop()
            fake.expire_all()  # forces a refresh while Redis is down
            statuses = [
                session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code
                for _ in range(5)
            ]
            auth.clear()
            statuses.append(session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code)
    finally:
        server.stop()
    assert statuses == [200] * 6
    warnings = [m for m in leak_watch.messages if "cannot use the token cache redis://" in m]
    assert len(warnings) == 1
    assert f"using {tmp_path / 'local'} instead" in warnings[0]
    assert fake.token_requests == 3  # the first, the 401's replacement, the one after clear()


def test_unreachable_redis_from_the_start_never_fails_a_request(
    fake: FakeEdrv, tmp_path: Path
) -> None:
    """A Redis URL nobody listens on: requests work from the file cache."""
    from redis_server import free_port

    local = auth_maker(fake, cache_dir=tmp_path / "local")
    auth = local(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200
    other = local(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert other.get_token() == auth.get_token()
    assert fake.token_requests == 1


def test_async_tasks_share_one_token_through_redis(fake: FakeEdrv, machine: MakeAuth) -> None:
    """50 AsyncClient tasks on a cold fleet cache: one token request, no blocked loop."""
    fake.token_delay = 0.3
    auth = machine()

    async def main() -> list[int]:
        async with httpx.AsyncClient(auth=auth) as client:
            responses = await asyncio.gather(*(client.get(f"{fake.url}/v1.1/x") for _ in range(50)))
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * 50
    assert fake.token_requests == 1


def test_a_flushed_redis_does_not_cost_a_token_request(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str, tmp_path: Path
) -> None:
    """After Redis loses its data, a machine reuses the token mirrored to its own file."""
    import redis

    token = machine(cache_dir=tmp_path / "kept").get_token()
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    assert machine(cache_dir=tmp_path / "kept").get_token() == token
    assert fake.token_requests == 1


def test_status_reports_the_token_the_core_uses_when_redis_is_empty(
    fake_env: FakeEdrv,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status` reads the caches as the core does: an empty Redis shows the file's token."""
    import redis

    monkeypatch.setenv("EDRV_AUTH_REDIS_URL", redis_url)
    monkeypatch.setenv("EDRV_AUTH_CACHE_DIR", str(tmp_path / "kept"))
    edrv_auth.EdrvAuth().get_token()
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    assert edrv_auth.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "nothing usable cached" not in out
    assert f"cache: {tmp_path / 'kept'}\n" in out
    assert "expires in: expired" not in out
    assert fake_env.token_requests == 1


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


# ---- what is read back is checked like the file ------------------------------------


def _plant(redis_url: str, key: str, value: bytes) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.set(key, value)
    finally:
        client.close()


def _state(token: str, obtained_at: float, expires_at: float, requests: list[float]) -> bytes:
    document = {
        "version": 1,
        "token": {
            "access_token": token,
            "obtained_at": obtained_at,
            "expires_at": expires_at,
            "scope": "",
        },
        "token_requests": requests,
    }
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("obtained_in", "expires_in"),
    [(0, 1e15), (0, 31 * 86400), (3600, 7200)],
    ids=["expires-at-1e15", "lifetime-31-days", "obtained-an-hour-ahead"],
)
def test_planted_redis_lifetimes_are_not_trusted(
    fake: FakeEdrv,
    machine: MakeAuth,
    redis_url: str,
    obtained_in: float,
    expires_in: float,
) -> None:
    """A token in Redis with a lifetime over 30 days or from the future is replaced."""
    auth = machine()
    key = auth._describe().stores[0].key  # type: ignore[attr-defined]
    planted = fake.issue_token()
    now = time.time()
    _plant(redis_url, key, _state(planted, now + obtained_in, now + expires_in, []))
    assert auth.get_token() != planted
    assert fake.token_requests == 1


def test_oversized_redis_value_is_not_read(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """A value over 64 KiB is not fetched from Redis at all: its size is checked first."""
    import redis

    auth = machine()
    key = auth._describe().stores[0].key  # type: ignore[attr-defined]
    _plant(redis_url, key, b" " * (4 * 1024 * 1024))
    client = redis.Redis.from_url(redis_url)
    try:
        sent_before = client.info("stats")["total_net_output_bytes"]
        assert auth._describe().stores[0].read() is None
        sent = client.info("stats")["total_net_output_bytes"] - sent_before
    finally:
        client.close()
    assert sent < 64 * 1024
    assert auth.get_token() in fake.issued_tokens
    assert fake.token_requests == 1


def test_lock_without_ttl_falls_back_to_the_file_cache(
    fake: FakeEdrv,
    machine: MakeAuth,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    leak_watch: LeakWatch,
) -> None:
    """A Redis lock that never expires costs a cold process the lock timeout, then the file."""
    monkeypatch.setattr(edrv_auth, "_LOCK_TIMEOUT", 0.5)
    auth = machine()
    _plant(redis_url, auth._describe().stores[0].lock_key, b"a holder that set no TTL")  # type: ignore[attr-defined]
    started = time.monotonic()
    token = auth.get_token()
    assert time.monotonic() - started < 5
    assert token in fake.issued_tokens
    assert auth._describe().file_cache.read() is not None  # saved in the file cache
    assert any("using" in m and "instead" in m for m in leak_watch.messages)
    assert fake.token_requests == 1
    import redis

    client = redis.Redis.from_url(redis_url)
    try:  # the stuck lock now ends like a dead holder's: the fleet recovers by itself
        assert (
            0 < client.pttl(auth._describe().stores[0].lock_key) <= edrv_auth._REDIS_LOCK_TTL * 1000
        )  # type: ignore[attr-defined]
    finally:
        client.close()


def test_unreachable_token_endpoint_with_redis_is_a_token_request_error(
    fake: FakeEdrv, machine: MakeAuth, no_sleep: list[float]
) -> None:
    """Redis, a cold cache and a token endpoint refusing connections: TokenRequestError."""
    from redis_server import free_port

    auth = machine(token_url=f"http://127.0.0.1:{free_port()}/oauth/token")
    with pytest.raises(edrv_auth.TokenRequestError, match="could not reach"):
        auth.get_token()
    assert len(no_sleep) == 2  # three attempts, as without Redis


# ---- the Redis protocol itself ------------------------------------------------------


def test_compare_and_swap_does_not_replace_another_token(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """A write replacing a token that Redis no longer holds changes nothing (the Lua CAS)."""
    auth = machine()
    current = auth.get_token()
    store = auth._describe().stores[0]
    before = redis_data(redis_url)
    now = time.time()
    newer = edrv_auth._CacheRecord(edrv_auth._Token(edrv_auth._Secret("test-newer"), now, now + 60))
    store.write(newer, edrv_auth._Secret("test-some-older-token"))
    assert redis_data(redis_url) == before
    store.write(newer, edrv_auth._Secret(current))  # the token it holds: swapped
    state = store.read()
    assert state is not None
    assert state.token is not None
    assert state.token.access_token.value == "test-newer"


def test_lock_release_leaves_another_owners_lock(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """A holder whose lock expired and was taken by another releases nothing of theirs."""
    store = machine()._describe().stores[0]
    with store.locked(time.monotonic() + 5):
        _plant(redis_url, store.lock_key, b"another owner")  # type: ignore[attr-defined]
    assert redis_data(redis_url)[store.lock_key.encode()] == b"another owner"  # type: ignore[attr-defined]


def test_unreachable_redis_is_tried_again_30_s_later(
    fake: FakeEdrv, tmp_path: Path, clock: Clock
) -> None:
    """Redis unreachable at first is left alone for 30 s, then used again."""
    server = RedisServer()  # its port is known, and nothing listens on it yet
    fake.expires_in = 1  # every step below finds the token expired
    auth = edrv_auth.EdrvAuth(
        CLIENT_ID, CLIENT_SECRET, token_url=fake.token_url, api_url=fake.url,
        cache_dir=tmp_path / "local", redis_url=server.url,
    )  # fmt: skip
    first = auth.get_token()  # from the file cache: Redis is down
    with server:
        clock.advance(edrv_auth._REDIS_RETRY_AFTER - 1)  # a renewal: Redis still left alone
        second = auth.get_token()
        assert redis_data(server.url) == {}
        clock.advance(1)  # and one 30 s after Redis failed
        third = auth.get_token()
        data = redis_data(server.url)
    assert len({first, second, third}) == 3
    assert list(data) == [auth._describe().stores[0].key.encode()]  # type: ignore[attr-defined]
    assert (
        json.loads(data[auth._describe().stores[0].key.encode()])["token"]["access_token"] == third
    )  # type: ignore[attr-defined]


def test_a_flushed_redis_is_filled_again_by_the_next_renewal(
    fake: FakeEdrv,
    machine: MakeAuth,
    redis_url: str,
    tmp_path: Path,
    clock: Clock,
) -> None:
    """The renewal after a flush writes Redis again, though the file mirrors an older token."""
    import redis

    auth = machine(cache_dir=tmp_path / "kept")
    first = auth.get_token()
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    clock.advance(fake.expires_in)
    second = auth.get_token()
    assert second != first
    assert machine().get_token() == second  # a new machine finds it in Redis
    assert fake.token_requests == 2


def test_the_lock_carries_its_ttl_from_the_moment_it_is_taken(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str
) -> None:
    """While a token request runs, its lock in Redis already expires by itself: a holder that
    dies mid-request blocks nobody for longer than that."""
    import redis

    auth = machine()
    lock_key = auth._describe().stores[0].lock_key  # type: ignore[attr-defined]
    fake.token_delay = 1.0
    fetcher = threading.Thread(target=auth.get_token)
    fetcher.start()
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        while fake.token_requests == 0:
            assert time.monotonic() < deadline, "no token request"
            time.sleep(0.01)
        ttl = client.pttl(lock_key)
    finally:
        client.close()
        fetcher.join()
    assert 0 < ttl <= edrv_auth._REDIS_LOCK_TTL * 1000


def test_a_new_process_prefers_the_token_in_redis_over_an_older_one_in_its_file(
    fake: FakeEdrv, machine: MakeAuth, redis_url: str, tmp_path: Path
) -> None:
    """Redis is what the fleet shares: a machine whose own file still holds an older valid
    token uses the one in Redis."""
    auth = machine()
    now = time.time()
    older = fake.issue_token()
    newer = fake.issue_token()
    state = edrv_auth._CacheRecord(
        edrv_auth._Token(edrv_auth._Secret(older), now - 600, now + 3000)
    )
    auth._describe().file_cache.write(state)
    redis_key = auth._describe().stores[0].key  # type: ignore[attr-defined]
    _plant(redis_url, redis_key, _state(newer, now - 60, now + 3540, []))
    assert auth.get_token() == newer
    assert fake.token_requests == 0
