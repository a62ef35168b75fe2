"""Processes share one token, one lock and one storm cap, and survive their peers dying.

The fake eDRV runs in the pytest process; children (scripts running ``tests/_proc_worker.py``,
``multiprocessing`` spawn pools, forked children) call it over loopback HTTP, and the tests
read its counters here. Every child is killed if still running and reaped in ``finally``;
every script child's stdout and stderr are checked for secrets and issued tokens.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _proc_worker
import filelock
import pytest
import requests
from conftest import (
    Children,
    LeakWatch,
    MakeAuth,
    assert_no_leaks,
    digest,
    fork_ok,
    forked,
    wait_until,
)
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuthError, TokenRequestError

pytestmark = pytest.mark.posix_only  # SIGKILL and SIGSTOP the workers


def start_herd(
    children: Children, tmp_path: Path, count: int, *options: str
) -> tuple[list[subprocess.Popen[str]], Path]:
    """Start ``count`` herd children and wait until all of them wait for the go file."""
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    procs = [
        children.start("herd", "--ready", str(ready), "--go", str(go), *options)
        for _ in range(count)
    ]
    wait_until(lambda: len(list(ready.iterdir())) == count, "every child is ready", procs)
    return procs, go


def herd_results(children: Children, procs: list[subprocess.Popen[str]]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {"statuses": [], "errors": []}
    for proc in procs:
        report = children.result(proc)
        merged["statuses"] += report["statuses"]
        merged["errors"] += report["errors"]
    return merged


def start_lock_holder(children: Children, *, hung: bool = False) -> subprocess.Popen[str]:
    """Start a child that takes the token cache lock and keeps it; return once it holds it.

    ``hung``: then stop it (SIGSTOP), as a process that hangs while holding the lock.
    """
    ready = children.folder / "holding"
    holder = children.start("hold-lock", "--ready", str(ready))
    wait_until(ready.exists, "the child holds the lock", [holder])
    if hung:
        os.kill(holder.pid, signal.SIGSTOP)
    return holder


# ---- One token for many processes -------------------------------------------


def test_cold_herd_of_processes_and_threads_makes_one_token_request(
    fake_env: FakeEdrv, children: Children, tmp_path: Path
) -> None:
    """6 processes x 4 threads started together on a cold cache cause exactly one token request."""
    fake_env.token_delay = 0.3  # a slow endpoint, so that the whole herd arrives during it
    procs, go = start_herd(children, tmp_path, 6, "--threads", "4", "--requests", "3")
    go.touch()
    results = herd_results(children, procs)
    assert results == {"statuses": [200] * 72, "errors": []}
    assert fake_env.counts() == {
        "token_requests": 1,
        "tokens_issued": 1,
        "api_requests": 72,
        "api_401s": 0,
    }


def test_new_process_with_warm_cache_makes_no_token_request(
    fake_env: FakeEdrv, children: Children, make_auth: MakeAuth
) -> None:
    """A new process that finds a valid token in the cache file uses it and asks for none."""
    token = make_auth().get_token()
    assert fake_env.token_requests == 1
    report = children.result(children.start("herd"))
    assert report == {"statuses": [200], "errors": []}
    assert fake_env.token_requests == 1
    assert fake_env.api_auth_headers == [f"Bearer {token}"]


def test_requests_and_httpx_processes_share_one_token(
    fake_env: FakeEdrv, children: Children, tmp_path: Path
) -> None:
    """A requests process and an httpx process on one cold cache cause one token request."""
    fake_env.token_delay = 0.3
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    common = ("herd", "--ready", str(ready), "--go", str(go), "--threads", "2", "--requests", "2")
    procs = [
        children.start(*common, "--client", "requests"),
        children.start(*common, "--client", "httpx"),
    ]
    wait_until(lambda: len(list(ready.iterdir())) == 2, "both children are ready", procs)
    go.touch()
    assert herd_results(children, procs) == {"statuses": [200] * 8, "errors": []}
    assert fake_env.token_requests == 1
    assert len(set(fake_env.api_auth_headers)) == 1


# ---- Compare-and-swap on 401, and the shared storm cap ----------------------


def test_concurrent_401s_across_processes_cause_one_token_request(
    fake_env: FakeEdrv,
    children: Children,
    tmp_path: Path,
    make_auth: MakeAuth,
) -> None:
    """24 callers in 6 processes rejected with one expired token cause one new token request."""
    old = make_auth().get_token()
    # Each thread loads the cached token into its own EdrvAuth before the start, so every
    # first call carries the old token and gets a 401.
    procs, go = start_herd(children, tmp_path, 6, "--threads", "4", "--preload")
    assert fake_env.token_requests == 1
    fake_env.expire_all()
    fake_env.token_delay = 0.3
    go.touch()
    results = herd_results(children, procs)
    assert results == {"statuses": [200] * 24, "errors": []}
    assert fake_env.token_requests == 2
    assert (fake_env.api_requests, fake_env.api_401s) == (48, 24)
    headers = fake_env.api_auth_headers
    assert headers.count(f"Bearer {old}") == 24
    assert len(set(headers)) == 2  # every retry carried the same new token


def test_storm_cap_is_shared_across_processes(
    fake_env: FakeEdrv, children: Children, tmp_path: Path
) -> None:
    """4 processes x 10 rejected requests make 5 token requests in all; every caller gets 401."""
    procs, go = start_herd(children, tmp_path, 4, "--requests", "10")
    fake_env.reject_all = True
    go.touch()
    results = herd_results(children, procs)
    assert results == {"statuses": [401] * 40, "errors": []}
    # The first fetch and 4 replacements: the cap (5 a minute) counts them all, across processes.
    assert fake_env.token_requests == edrv_auth._MAX_TOKEN_REQUESTS == 5


# ---- Pickling for multiprocessing spawn ------------------------------------


@contextlib.contextmanager
def spawn_pool() -> Iterator[Any]:
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def test_auth_pickles_without_token_and_works_in_spawn_worker(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A used EdrvAuth pickles without its token and, in a spawn worker, reuses the cached one."""
    auth = make_auth()
    token = auth.get_token()  # memory, runtime lock and FileLock are all populated now
    data = pickle.dumps(auth)
    assert token.encode() not in data
    assert repr(pickle.loads(data)) == repr(auth)
    with spawn_pool() as pool:
        status = pool.apply(_proc_worker.pool_request, (auth, fake.url + "/v1.1/x"))
    assert status == 200
    assert fake.token_requests == 1
    assert fake.api_auth_headers == [f"Bearer {token}"]


def test_token_request_error_crosses_spawn_pool_intact(
    fake: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """A TokenRequestError raised in a spawn worker reaches the parent with its status and error."""
    fake.queue_token_response(401, {"error": "access_denied", "error_description": "Unauthorized"})
    with spawn_pool() as pool, pytest.raises(TokenRequestError) as caught:
        pool.apply(_proc_worker.pool_get_token, (make_auth(),))
    assert type(caught.value) is TokenRequestError
    assert (caught.value.status_code, caught.value.error) == (401, "access_denied")
    assert "HTTP 401 access_denied" in str(caught.value)
    assert fake.token_requests == 1
    assert_no_leaks(leak_watch, fake, str(caught.value))


# ---- fork ------------------------------------------------------------------


def child_request(auth: edrv_auth.EdrvAuth, url: str, writer: Connection) -> None:
    with requests.Session() as session:
        writer.send(session.get(url, auth=auth, timeout=30).status_code)
    writer.close()


def child_clear_and_get(auth: edrv_auth.EdrvAuth, writer: Connection) -> None:
    auth.clear()
    writer.send(digest(auth.get_token()))
    writer.close()


@fork_ok
@pytest.mark.needs_fork
def test_forked_child_reuses_inherited_token(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """A forked child authenticates with the instance's in-memory token and asks for none."""
    auth = make_auth()
    token = auth.get_token()
    with forked(child_request, auth, fake.url + "/v1.1/x") as (proc, reader):
        proc.join(10)
        assert proc.exitcode == 0
        assert reader.recv() == 200
    assert fake.token_requests == 1
    assert fake.api_auth_headers == [f"Bearer {token}"]


@fork_ok
@pytest.mark.needs_fork
def test_thread_lock_held_at_fork_does_not_deadlock_child(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A child forked while another thread holds the in-process lock can clear and get a token."""
    auth = make_auth()
    auth.get_token()
    lock = auth._describe().thread_lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        with forked(child_clear_and_get, auth) as (proc, reader):
            proc.join(10)
            assert proc.exitcode == 0
            new = reader.recv()
    finally:
        release.set()
        holder.join(10)
    assert fake.token_requests == 2  # the child cleared the cache, so it fetched one
    assert fake.api_requests == 0
    assert new == digest(make_auth().get_token())  # and saved it for everyone


@fork_ok
@pytest.mark.needs_fork
def test_file_lock_held_at_fork_keeps_child_waiting_until_released(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A child forked while the parent holds the cache lock waits for it, then proceeds."""
    auth = make_auth()
    auth.get_token()
    held = contextlib.ExitStack()
    held.enter_context(auth._describe().file_cache.locked(time.monotonic() + 5))
    try:
        with forked(child_clear_and_get, auth) as (proc, reader):
            # The lock belongs to the parent: the child must not act as if it held it too.
            proc.join(0.5)
            assert proc.is_alive()
            assert fake.token_requests == 1
            held.close()
            proc.join(10)
            assert proc.exitcode == 0
            new = reader.recv()
    finally:
        held.close()
    assert fake.token_requests == 2
    assert new == digest(make_auth().get_token())


# ---- Dead and hung lock holders ---------------------------------------------


def test_sigkilled_lock_holder_releases_the_lock_at_once(
    fake_env: FakeEdrv, children: Children, make_auth: MakeAuth
) -> None:
    """After the process holding the cache lock is SIGKILLed, a token comes at once."""
    holder = start_lock_holder(children)
    auth = make_auth()
    probe = auth._describe().file_cache.make_lock()
    with pytest.raises(filelock.Timeout):
        probe.acquire(timeout=0)  # the child really holds it
    children.kill(holder)
    assert holder.returncode == -signal.SIGKILL
    started = time.monotonic()
    auth.get_token()
    assert time.monotonic() - started < 5.0
    assert fake_env.token_requests == 1


def test_process_killed_mid_token_request_does_not_block_the_next(
    fake_env: FakeEdrv, children: Children
) -> None:
    """A process SIGKILLed while its token request is in flight leaves the next one unblocked."""
    fake_env.token_delay = 2.0
    victim = children.start("token")
    wait_until(lambda: fake_env.token_requests == 1, "the child's token request", [victim])
    children.kill(victim)
    assert victim.returncode == -signal.SIGKILL
    fake_env.token_delay = 0.0
    report = children.result(children.start("token"))
    assert set(report) == {"token_sha256", "elapsed", "ended"}
    assert report["elapsed"] < 5.0
    assert fake_env.token_requests == 2


def test_hung_lock_holder_fails_a_cold_process_after_the_lock_timeout(
    fake_env: FakeEdrv, children: Children, make_auth: MakeAuth
) -> None:
    """With the lock held by a stopped process, a process needing a token fails on the timeout."""
    start_lock_holder(children, hung=True)
    report = children.result(children.start("token", "--lock-timeout", "1.0"))
    assert report["error"] == "EdrvAuthError"
    assert str(make_auth()._describe().file_cache.lock_path) in report["message"]
    assert 0.9 <= report["elapsed"] < 5.0
    assert fake_env.token_requests == 0


def test_hung_lock_holder_does_not_delay_a_warm_cache_read(
    fake_env: FakeEdrv, children: Children, make_auth: MakeAuth
) -> None:
    """A valid cached token is read at once even while a hung process holds the lock."""
    token = make_auth().get_token()
    start_lock_holder(children, hung=True)
    report = children.result(children.start("token"))  # default 30 s lock timeout
    assert report["token_sha256"] == digest(token)
    assert report["elapsed"] < 5.0
    assert fake_env.token_requests == 1


def test_lock_timeout_raises_edrv_auth_error_chained_from_filelock(
    fake_env: FakeEdrv, children: Children, make_auth: MakeAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock timeout raises EdrvAuthError (not filelock.Timeout), chained from the timeout."""
    monkeypatch.setattr(edrv_auth, "_LOCK_TIMEOUT", 0.3)
    start_lock_holder(children)
    with pytest.raises(EdrvAuthError, match="token cache lock") as caught:
        make_auth().get_token()
    assert type(caught.value) is EdrvAuthError
    assert isinstance(caught.value.__cause__, filelock.Timeout)
    assert fake_env.token_requests == 0
