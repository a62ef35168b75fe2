"""Renewal that nobody waits for, failures that every waiter shares, short tokens that work.

A token past its refresh time that will outlive a token request is still sent while a
background thread renews it: threads, tasks and other processes measure their longest
request against a token endpoint that takes seconds to answer. A token request that
fails while others wait for it ends them all with its error. Tokens living a second or
two are honoured exactly, under load, through requests and httpx.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from conftest import ROOT, Clock, MakeAuth, finish_renewal, in_threads, run_python
from fake_edrv import FakeEdrv
from test_processes import Children, digest, fork_ok, forked, wait_until

import edrv_auth
from edrv_auth import EdrvAuth, TokenRequestError

#: How long the fake takes to answer a token request in these tests: far longer than
#: any API call, so that a caller who waited for the renewal shows.
SLOW_RENEWAL = 2.0


def plant_due_token(auth: EdrvAuth, fake: FakeEdrv, left: float = 200.0) -> str:
    """Cache a token that the fake accepts for an hour but that says it expires in ``left``
    seconds: past its refresh time (margin 300 s), and outliving a renewal (timeout 10 s)."""
    token = fake.issue_token(3600)
    now = edrv_auth._clock.time()
    due = edrv_auth._Token(edrv_auth._Secret(token), now + left - 3600, now + left)
    auth._describe().file_cache.write(edrv_auth._CacheRecord(due))
    return token


@contextlib.contextmanager
def caller(client: str, auth: EdrvAuth, url: str) -> Iterator[Callable[[], int]]:
    """A function that makes one API call with ``client`` and returns its status."""
    if client == "httpx":
        with httpx.Client(auth=auth, timeout=30) as session:
            yield lambda: session.get(url).status_code
    else:
        with requests.Session() as session:
            yield lambda: session.get(url, auth=auth, timeout=30).status_code


# ---- no request waits for a renewal the token outlives ----------------------------------


@pytest.mark.parametrize("client", ["requests", "httpx"])
def test_threads_never_wait_for_a_renewal_the_token_outlives(
    fake: FakeEdrv, make_auth: MakeAuth, client: str
) -> None:
    """Eight threads call the API while a due token is renewed by an endpoint taking 2 s: no
    call takes more than a fraction of that, and the new token follows."""
    auth = make_auth()
    old = plant_due_token(auth, fake)
    fake.token_delay = SLOW_RENEWAL
    renewed = threading.Event()

    def calls() -> tuple[float, set[int]]:
        longest, statuses = 0.0, set()
        with caller(client, auth, f"{fake.url}/v1.1/x") as call:
            while not renewed.is_set():
                began = time.monotonic()
                statuses.add(call())
                longest = max(longest, time.monotonic() - began)
        return longest, statuses

    def renewal_watch() -> None:
        wait_until(lambda: auth._describe().renewal is not None, "a renewal starts")
        finish_renewal(auth)
        renewed.set()

    watch = threading.Thread(target=renewal_watch)
    watch.start()
    try:
        results = in_threads(8, calls)
    finally:
        renewed.set()
        watch.join()
    assert max(longest for longest, _ in results) < SLOW_RENEWAL / 2
    assert {status for _, statuses in results for status in statuses} == {200}
    assert fake.token_requests == 1
    assert fake.api_auth_headers[0] == f"Bearer {old}"
    with caller(client, auth, f"{fake.url}/v1.1/x") as call:
        assert call() == 200
    assert fake.api_auth_headers[-1] == f"Bearer {auth.get_token()}" != f"Bearer {old}"


def test_a_caller_already_waiting_for_the_lock_is_served_while_the_renewal_runs(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A thread that found nothing in memory just before another one published the due token
    waits for this process's lock, which the renewal then holds for its request: it is served
    the due token instead of waiting for the renewal. (Threads started together race into
    this; here the blocking path is entered directly.)"""
    auth = make_auth()
    old = plant_due_token(auth, fake)
    fake.token_delay = SLOW_RENEWAL
    assert auth.get_token() == old
    wait_until(lambda: fake.token_requests == 1, "the renewal's request, under the lock")
    began = time.monotonic()
    assert auth._source._obtain(None).access_token.value == old  # type: ignore[union-attr]
    assert time.monotonic() - began < SLOW_RENEWAL / 2
    finish_renewal(auth)


@pytest.mark.anyio
async def test_async_tasks_never_wait_for_a_renewal_the_token_outlives(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """Twenty tasks call the API while a due token is renewed slowly: none awaits it."""
    import anyio

    auth = make_auth()
    old = plant_due_token(auth, fake)
    fake.token_delay = SLOW_RENEWAL
    longest: list[float] = []

    async def calls(client: httpx.AsyncClient) -> None:
        for _ in range(10):
            began = time.monotonic()
            assert (await client.get(f"{fake.url}/v1.1/x")).status_code == 200
            longest.append(time.monotonic() - began)

    async with httpx.AsyncClient(auth=auth, timeout=30) as client, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(calls, client)
    assert max(longest) < SLOW_RENEWAL / 2
    assert set(fake.api_auth_headers) == {f"Bearer {old}"}  # all sent while it was renewed
    await anyio.to_thread.run_sync(finish_renewal, auth)
    assert fake.token_requests == 1
    assert await auth.aget_token() != old


def test_another_process_uses_the_due_token_while_the_renewal_holds_the_lock(
    fake_env: FakeEdrv, make_auth: MakeAuth, children: Children
) -> None:
    """While this process renews (holding the cross-process lock for 2 s), a new process that
    finds the token due in the cache uses it at once, and asks for no token of its own."""
    auth = make_auth()
    old = plant_due_token(auth, fake_env)
    fake_env.token_delay = SLOW_RENEWAL
    assert auth.get_token() == old
    wait_until(lambda: fake_env.token_requests == 1, "the renewal is under way")
    report = children.result(children.start("token", "--calls", "5"))
    assert report["token_sha256"] == digest(old)
    assert report["elapsed"] < SLOW_RENEWAL / 2
    assert report["longest_call"] < SLOW_RENEWAL / 2
    finish_renewal(auth)
    assert fake_env.token_requests == 1  # the child waited for the lock in its background


def test_command_line_finishes_the_renewal_it_started_before_exiting(
    fake_env: FakeEdrv, make_auth: MakeAuth
) -> None:
    """`token` prints the due token at once, and exits only once its renewal is saved: the
    next run finds the new token and asks for none."""
    old = plant_due_token(make_auth(), fake_env)
    fake_env.token_delay = 1.0
    first = run_python("-m", "edrv_auth", "token", cwd=ROOT)
    assert (first.returncode, first.stdout, first.stderr) == (0, f"{old}\n", "")
    assert fake_env.token_requests == 1
    second = run_python("-m", "edrv_auth", "token", cwd=ROOT)
    assert second.stdout.strip() in fake_env.issued_tokens
    assert second.stdout.strip() != old
    assert fake_env.token_requests == 1


@pytest.mark.parametrize("registered", ["after-the-import", "before-the-import"])
def test_a_due_token_needed_in_an_exit_handler_is_sent_and_no_renewal_is_lost(
    fake_env: FakeEdrv, make_auth: MakeAuth, registered: str
) -> None:
    """An exit handler that finds the token due gets it at once. A renewal it starts then
    (only where the exit handlers of edrv_auth have not run yet, and this Python can still
    start a thread and import filelock) is waited for and saved; otherwise none starts, and
    the next run renews the token: a token request made at exit is never lost."""
    old = plant_due_token(make_auth(), fake_env)
    handler = "atexit.register(lambda: print(len(auth.get_token())))\n"
    code = (
        "import atexit\n"
        + (handler if registered == "before-the-import" else "")
        + "import edrv_auth\n"
        + "auth = edrv_auth.EdrvAuth()\n"
        + (handler if registered == "after-the-import" else "")
    )
    result = run_python("-c", code, cwd=ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{len(old)}\n", "")
    cached = make_auth().get_token()
    assert fake_env.token_requests in (0, 1)
    assert (cached != old) == (fake_env.token_requests == 1)
    if registered == "before-the-import":  # edrv_auth's exit handler ran first: none started
        assert (cached, fake_env.token_requests) == (old, 0)


def test_no_renewal_starts_once_the_exit_handler_has_run(
    fake_env: FakeEdrv, make_auth: MakeAuth
) -> None:
    """After edrv_auth's exit handler has waited for the renewals, a due token is sent and no
    thread starts a renewal that the interpreter would kill mid-request."""
    old = plant_due_token(make_auth(), fake_env)
    code = (
        "import edrv_auth\n"
        "auth = edrv_auth.EdrvAuth()\n"
        "edrv_auth._renewals.finish()  # what the interpreter calls at exit\n"
        "print(len(auth.get_token()), auth._describe().renewal is None)\n"
    )
    result = run_python("-c", code, cwd=ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{len(old)} True\n", "")
    assert fake_env.token_requests == 0


@fork_ok
@pytest.mark.needs_fork
def test_a_renewal_in_flight_at_fork_is_not_inherited(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """A child forked during a slow renewal has none of its own in flight; it sends the due
    token at once and starts a renewal of its own."""
    auth = make_auth()
    old = plant_due_token(auth, fake)
    fake.token_delay = SLOW_RENEWAL
    assert auth.get_token() == old
    wait_until(lambda: fake.token_requests == 1, "the renewal is under way")

    def child(auth: EdrvAuth, writer: Any) -> None:
        inherited = auth._describe().renewal
        began = time.monotonic()
        token = auth.get_token()
        writer.send((inherited is None, time.monotonic() - began, digest(token)))
        writer.send(auth._describe().renewal is not None)
        writer.close()

    with forked(child, auth) as (proc, reader):
        none_inherited, elapsed, token = reader.recv()
        started_its_own = reader.recv()
        proc.join(10)
    assert (none_inherited, token, started_its_own) == (True, digest(old), True)
    assert elapsed < SLOW_RENEWAL / 2
    finish_renewal(auth)


def test_an_instance_pickled_during_a_renewal_gets_the_token_from_the_cache(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """An instance pickled while it renews in the background carries neither the renewal nor
    a token: unpickled, it shares the renewal of its credentials, then the new token."""
    import pickle

    auth = make_auth()
    old = plant_due_token(auth, fake)
    fake.token_delay = 1.0
    auth.get_token()
    copy = pickle.loads(pickle.dumps(auth))
    assert copy._describe().published is None
    assert copy.get_token() == old  # due, and renewed in the background already
    assert copy._describe().renewal is auth._describe().renewal
    finish_renewal(auth)
    copy.get_token()  # it may send the due token once more, while it reads the new one
    finish_renewal(copy)
    assert copy.get_token() == auth.get_token() != old
    assert fake.token_requests == 1


def test_many_instances_of_one_credential_set_share_one_renewal(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """An application that builds an EdrvAuth per request, during a slow renewal: one
    background renewal for all of them, and one token request."""
    first = make_auth()
    old = plant_due_token(first, fake)
    fake.token_delay = 1.0
    auths = [make_auth() for _ in range(50)]
    began = time.monotonic()
    assert {auth.get_token() for auth in auths} == {old}
    assert time.monotonic() - began < 0.5
    assert len({id(auth._describe().renewal) for auth in auths}) == 1
    finish_renewal(auths[0])
    assert make_auth().get_token() != old
    assert fake.token_requests == 1


def test_a_renewal_with_the_longest_timeout_still_waits_for_the_lock(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """timeout=25 leaves a renewal no time to wait for a lock before 25 s: it still waits a
    few seconds, here while another thread holds this process's lock for a moment."""
    auth = make_auth(timeout=25)
    old = plant_due_token(auth, fake, left=3000)  # fresh for another 2700 s
    assert auth.get_token() == old
    clock.advance(2800)  # due, with 200 s left
    with auth._describe().thread_lock:
        assert auth.get_token() == old  # sent at once; the renewal waits for the lock
        time.sleep(0.5)
    finish_renewal(auth)
    assert fake.token_requests == 1
    assert auth.get_token() != old


def test_a_token_closer_to_expiry_than_timeout_is_renewed_before_use(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """Five seconds left and a 10 s timeout: the token may die before a background renewal
    ends, so the caller waits for the new one."""
    auth = make_auth(timeout=10)
    old = plant_due_token(auth, fake, left=5)
    fake.token_delay = 0.5
    assert auth.get_token() != old
    assert auth._describe().renewal is None
    assert fake.token_requests == 1


# ---- waiters share the outcome ----------------------------------------------------------


@pytest.mark.parametrize("cached", ["nothing", "an-expired-token"])
def test_processes_waiting_for_a_failing_request_share_its_failure(
    fake_env: FakeEdrv, children: Children, tmp_path: Path, make_auth: MakeAuth, cached: str
) -> None:
    """Three processes need a token and eDRV is failing: one makes its three attempts, and all
    three end together with its message; nobody repeats the request or times out on the lock.
    The same whether the cache was empty or held an expired token."""
    if cached == "an-expired-token":
        plant_due_token(make_auth(), fake_env, left=-1)
    for _ in range(3):
        fake_env.queue_token_response(503, {"error": "temporarily_unavailable"}, delay=1.0)
    go = tmp_path / "go"
    procs = [children.start("token", "--go", str(go)) for _ in range(3)]
    time.sleep(1.0)  # every child imports and waits for the go file
    go.touch()
    reports = [children.result(proc) for proc in procs]
    assert fake_env.token_requests == 3
    assert {report.get("message") for report in reports} == {reports[0]["message"]}
    assert "HTTP 503 temporarily_unavailable" in reports[0]["message"]
    ends = [report["ended"] for report in reports]
    assert max(ends) - min(ends) < 1.0
    assert max(report["elapsed"] for report in reports) > 3.0  # they did wait for it


@pytest.mark.parametrize("cached", ["nothing", "an-expired-token"])
def test_threads_waiting_for_a_failing_request_share_its_failure(
    fake: FakeEdrv, make_auth: MakeAuth, no_sleep: list[float], cached: str
) -> None:
    """Threads waiting for another thread's failing token request get its error, whether the
    cache was empty or held an expired token (the usual state in an outage)."""
    for _ in range(3):
        fake.queue_token_response(503, {"error": "temporarily_unavailable"}, delay=0.3)
    auth = make_auth()
    if cached == "an-expired-token":
        plant_due_token(auth, fake, left=-1)
    outcomes = in_threads(6, lambda: _error_of(auth.get_token))
    assert fake.token_requests == 3
    assert len(set(outcomes)) == 1
    assert "HTTP 503" in outcomes[0]


def test_a_caller_arriving_after_a_failure_tries_again(
    fake: FakeEdrv, make_auth: MakeAuth, no_sleep: list[float]
) -> None:
    """The shared failure is for those who waited for it: a later caller makes its own
    request (within the cap)."""
    fake.queue_token_response(400, {"error": "invalid_request"})
    auth = make_auth()
    with pytest.raises(TokenRequestError, match="HTTP 400"):
        auth.get_token()
    assert auth._describe().file_cache.read().failure is not None  # type: ignore[union-attr]
    assert make_auth().get_token() in fake.issued_tokens
    assert fake.token_requests == 2
    assert auth._describe().file_cache.read().failure is None  # type: ignore[union-attr]


def test_a_failure_recorded_while_a_process_waits_is_raised_as_it_was(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A process waiting for the cache lock, whose holder records a failure: it raises that
    failure, message, status_code and error, without a request of its own."""
    auth = make_auth()
    file_cache = auth._describe().file_cache
    failure = edrv_auth._SharedFailure(
        edrv_auth._clock.time(), "token request failed: HTTP 400 invalid_request", 400, "x"
    )
    outcome: list[BaseException] = []

    def wait_then_get() -> None:
        try:
            auth.get_token()
        except TokenRequestError as exc:
            outcome.append(exc)

    with file_cache.locked(time.monotonic() + 10):  # another process's token request
        waiter = threading.Thread(target=wait_then_get)
        waiter.start()
        time.sleep(0.3)  # the waiter reads the cache, then waits for the lock
        file_cache.write(edrv_auth._CacheRecord(failure=failure))
    waiter.join(10)
    (error,) = outcome
    assert isinstance(error, TokenRequestError)
    assert (str(error), error.status_code, error.error) == (failure.message, 400, "x")
    assert fake.token_requests == 0


@pytest.mark.parametrize("ahead", [0.0, 20.0], ids=["same-clock", "clock-20-s-ahead"])
def test_a_failure_recorded_before_a_caller_came_is_not_its_failure(
    fake: FakeEdrv, make_auth: MakeAuth, ahead: float
) -> None:
    """A failure already in the cache when a caller arrives (even one stamped by a machine
    whose clock runs ahead) is for those who waited: this caller makes its own request."""
    auth = make_auth()
    failure = edrv_auth._SharedFailure(edrv_auth._clock.time() + ahead, "an earlier failure")
    auth._describe().file_cache.write(edrv_auth._CacheRecord(failure=failure))
    assert auth.get_token() in fake.issued_tokens
    assert fake.token_requests == 1


def _error_of(call: Callable[[], object]) -> str:
    try:
        call()
    except TokenRequestError as exc:
        return str(exc)
    return "no error"


# ---- short lifetimes --------------------------------------------------------------------


@pytest.mark.parametrize("lifetime", [2.0, 1.0])
def test_short_tokens_under_load_never_fail(
    fake: FakeEdrv, make_auth: MakeAuth, lifetime: float
) -> None:
    """Tokens living 2 s (or 1 s), four requests and four httpx threads calling for 4 s:
    no failure, no 401, and about one token request per half lifetime."""
    fake.expires_in = lifetime
    auth = make_auth()
    ends = time.monotonic() + 4.0
    clients = iter(["requests", "httpx"] * 4)
    lock = threading.Lock()

    def calls() -> list[int | str]:
        with lock:
            client = next(clients)
        outcomes: list[int | str] = []
        with caller(client, auth, f"{fake.url}/v1.1/x") as call:
            while time.monotonic() < ends:
                try:
                    outcomes.append(call())
                except Exception as exc:  # counted: must not happen
                    outcomes.append(type(exc).__name__)
        return outcomes

    outcomes = [outcome for thread in in_threads(8, calls) for outcome in thread]
    assert set(outcomes) == {200}
    assert fake.api_401s == 0
    assert 4.0 / lifetime <= fake.token_requests <= 2 * 4.0 / lifetime + 2


def test_one_second_tokens_are_replaced_before_their_margin_and_never_sent_expired(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """1 s tokens with refresh_margin=0.7: a call 0.45 s later is inside the margin and gets a
    new token; so does one 1.2 s later, past the expiry."""
    fake.expires_in = 1
    auth = make_auth(refresh_margin=0.7)
    first = auth.get_token()
    clock.advance(0.45)
    second = auth.get_token()
    assert second != first
    clock.advance(1.2)
    assert auth.get_token() not in (first, second)
    assert fake.token_requests == 3


def test_a_process_started_after_a_short_token_expired_gets_a_new_one(
    fake_env: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A 1 s token in the cache, 1.2 s later: a new process (and the command line, which
    reads the same record) never gets the expired token."""
    fake_env.expires_in = 1
    expired = make_auth().get_token()
    clock.advance(1.2)
    assert make_auth().get_token() != expired
    assert fake_env.token_requests == 2
    result = subprocess.run(
        [sys.executable, "-m", "edrv_auth", "token"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.strip() != expired  # real time has moved on too


def test_a_bogus_lifetime_counts_as_one_second(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """`expires_in` of a millisecond: the token is taken to live one second, so a burst of
    calls within that second makes one token request."""
    body = {"access_token": fake.issue_token(3600), "expires_in": 0.001}
    fake.queue_token_response(200, body)
    auth = make_auth()
    tokens = set()
    for _ in range(40):
        tokens.add(auth.get_token())
        clock.advance(0.01)
    assert (len(tokens), fake.token_requests) == (1, 1)
    token = auth._describe().published.token  # type: ignore[union-attr]
    assert token.expires_at - token.obtained_at == edrv_auth._MIN_LIFETIME
