"""The secret-leak sweep: every path, every place a secret could land.

Each test drives one path through the real adapters against the loopback fake, with the root
logger at DEBUG and a handler on it, so that every logger is captured: ``edrv_auth`` (also
watched by the autouse ``leak_watch``), and the ``urllib3``, ``httpx``, ``httpcore``,
``filelock`` and ``asyncio`` loggers of the libraries it drives. Then :meth:`Sweep.check`
looks for the client secret, the API key, the wrong secret some tests send, every token the
fake issued and every token-shaped string a test planted, in:

- every captured log record, of any logger (exception text included);
- ``str``, ``repr`` and the formatted traceback of every exception a test caught, and what
  an error reporter (Sentry, Rollbar, ``traceback`` with ``capture_locals=True``) collects
  from it: the local variables of every frame of it and of its chained exceptions, strings,
  bytes, tuples, lists, sets and dicts walked field by field, anything else by ``repr``;
- ``str`` and ``repr`` of ``EdrvAuth`` and of what its read-only view shows (the token
  values, the cache record, the token endpoint, ``_FileCache``, the ``FileLock``);
- the CLI's stderr (and its stdout, except for ``token``, whose stdout is the token);
- every file under the test's ``tmp_path`` (its name and its bytes): the lock file, any
  temporary file, anything. The cache file is the one place a token may be, and even it may
  not hold the client secret or the API key.

Third-party loggers: urllib3 and httpx log request lines (method, URL, status), httpcore at
DEBUG logs the response status and response headers (never request headers), filelock logs
lock paths. None of them sees our secret or token unless we put it in a URL, which is what the
sweep would catch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import httpx
import pytest
import requests
import trio
from conftest import (
    API_KEY,
    CLIENT_SECRET,
    Clock,
    LeakWatch,
    MakeAuth,
    _closed_port,
    finish_renewal,
)
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuthError, TokenRequestError

#: A second canary: a wrong secret that a test sends, and that the endpoint echoes back.
WRONG_SECRET = "test-wrong-secret-canary-5e0f31"


class _AllRecords(logging.Handler):
    """Every record of every logger, as (logger name, formatted text)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        self.records.append((record.name, text))


class Sweep:
    """Collects what a test produced and checks all of it, and all files, for secrets."""

    def __init__(self, fake: FakeEdrv, tmp_path: Path, handler: _AllRecords) -> None:
        self.fake = fake
        self.tmp_path = tmp_path
        self.handler = handler
        self.planted: set[str] = set()
        self.texts: list[tuple[str, str]] = []
        self.auths: list[edrv_auth.EdrvAuth] = []

    def watch(self, auth: edrv_auth.EdrvAuth) -> edrv_auth.EdrvAuth:
        """Remember `auth`: its reprs and its cache file are checked at the end."""
        self.auths.append(auth)
        return auth

    def text(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def error(
        self, where: str, call: Callable[[], object], *, frames: bool = True
    ) -> EdrvAuthError:
        """Run `call`, which must raise EdrvAuthError; keep its str, repr and traceback.

        ``frames``: also keep what an error reporter collects from its frames (off only
        where the caller itself put a canary into its own arguments).
        """
        with pytest.raises(EdrvAuthError) as info:
            call()
        exc = info.value
        self.text(f"str({where})", str(exc))
        self.text(f"repr({where})", repr(exc))
        self.text(f"traceback({where})", "".join(traceback.format_exception(exc)))
        for frame, text in reporter_view(exc) if frames else ():
            self.text(f"{where}: a local of {frame}", text)
        if isinstance(exc, TokenRequestError):
            self.text(f"{where}.error", str(exc.error))
        return exc

    def secrets(self) -> set[str]:
        return {CLIENT_SECRET, API_KEY, WRONG_SECRET, *self.fake.issued_tokens, *self.planted}

    def _object_texts(self) -> Iterator[tuple[str, str]]:
        for i, auth in enumerate(self.auths):
            view = auth._describe()
            if view is None:  # API-key mode: the object itself is all there is
                yield f"repr(auth{i})", repr(auth)
                yield f"str(auth{i})", str(auth)
                continue
            published = view.published
            objects: dict[str, object] = {
                "EdrvAuth": auth,
                "the view": view,
                "the remembered record": view.remembered,
                "its token": view.remembered.token,
                "the published token": published,
                "its token value": published.token if published else None,
                "the token endpoint": view.endpoint,
                "_FileCache": view.file_cache,
                "FileLock": view.file_cache._lock,
            }
            for name, value in objects.items():
                yield f"repr(auth{i} {name})", repr(value)
                yield f"str(auth{i} {name})", str(value)

    def check(self, *, logged: bool = True) -> None:
        """Assert that no record, text, object or file holds a secret (tokens: cache file only).

        ``logged``: whether the path logs at all (so that an empty capture cannot pass unnoticed).
        """
        secrets = self.secrets()
        views = [auth._describe() for auth in self.auths]
        cache_files = {view.file_cache.path for view in views if view is not None}
        found: list[tuple[str, str]] = []
        places = [
            *((f"log record of {name}", text) for name, text in self.handler.records),
            *self.texts,
            *self._object_texts(),
        ]
        for where, text in places:
            found += [(where, secret) for secret in secrets if secret in text]
        files = [path for path in self.tmp_path.rglob("*") if path.is_file()]
        for path in files:
            data = path.read_bytes()
            # Only the cache file may hold a token, and nothing else that is secret.
            forbidden = {CLIENT_SECRET, API_KEY, WRONG_SECRET} if path in cache_files else secrets
            found += [(f"file {path}", s) for s in forbidden if s.encode() in data]
            found += [(f"file name {path}", s) for s in secrets if s in str(path)]
        assert found == []
        assert bool(self.handler.records) == logged


_TESTS = Path(__file__).resolve().parent


def reporter_view(exc: BaseException) -> Iterator[tuple[str, str]]:
    """What an error reporter collects from ``exc``: every frame's locals, walked.

    Sentry's and Rollbar's serialisers, like ``TracebackException(capture_locals=True)``,
    visit each frame of the traceback of the error and of its ``__cause__`` and
    ``__context__``; they descend into containers and show other objects by ``repr``.
    The tests' own frames are skipped: they hold the canaries on purpose.
    """
    seen: set[int] = set()
    chain: list[BaseException] = [exc]
    while chain:
        error = chain.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        chain += [e for e in (error.__cause__, error.__context__) if e is not None]
        tb = error.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            name = f"{code.co_name} ({code.co_filename}:{tb.tb_lineno})"
            if Path(code.co_filename).parent == _TESTS:
                tb = tb.tb_next
                continue
            for key, value in tb.tb_frame.f_locals.items():
                for text in _walk(value, depth=0):
                    yield name, f"{key}={text}"
            tb = tb.tb_next


def _walk(value: object, depth: int) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        yield bytes(value).decode("latin-1")
    elif depth < 6 and isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            yield from _walk(item, depth + 1)
    elif depth < 6 and isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(key, depth + 1)
            yield from _walk(item, depth + 1)
    else:
        try:
            yield repr(value)
        except Exception as exc:  # a broken repr is the reporter's problem, not a leak
            yield f"<repr failed: {type(exc).__name__}>"


@pytest.fixture
def sweep(fake: FakeEdrv, tmp_path: Path) -> Iterator[Sweep]:
    """Capture every logger at DEBUG through the root logger for the test; restore it after."""
    root = logging.getLogger()
    handler = _AllRecords()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield Sweep(fake, tmp_path, handler)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _httpx_sync_get(auth: edrv_auth.EdrvAuth, url: str) -> int:
    with httpx.Client(auth=auth) as client:
        return client.get(url).status_code


async def _httpx_async_get(auth: edrv_auth.EdrvAuth, url: str) -> int:
    async with httpx.AsyncClient(auth=auth) as client:
        return (await client.get(url)).status_code


# ---- token paths that work -----------------------------------------------------------


def test_cold_fetch_and_warm_reuse_leak_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """A cold fetch and a second instance reusing the cached token leak nothing anywhere."""
    cold = sweep.watch(make_auth())
    assert requests.get(f"{fake.url}/v1.1/chargestations", auth=cold, timeout=5).status_code == 200
    warm = sweep.watch(make_auth())
    assert warm.get_token() == cold.get_token()
    assert _httpx_sync_get(warm, f"{fake.url}/v1.1/sessions") == 200
    assert fake.token_requests == 1
    sweep.check()


def test_401_retry_with_requests_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """A requests call whose token expired server-side is retried once, leaking nothing."""
    auth = sweep.watch(make_auth())
    auth.get_token()
    fake.expire_all()
    response = requests.get(f"{fake.url}/v1.1/chargestations", auth=auth, timeout=5)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert (fake.token_requests, fake.api_401s) == (2, 1)
    sweep.check()


def test_401_retry_with_httpx_sync_and_async_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """httpx.Client, and httpx.AsyncClient under asyncio and trio, retry a 401 leaking nothing."""
    auth = sweep.watch(make_auth())
    url = f"{fake.url}/v1.1/chargestations"
    auth.get_token()
    fake.expire_all()
    assert _httpx_sync_get(auth, url) == 200
    fake.expire_all()
    assert asyncio.run(_httpx_async_get(auth, url)) == 200
    fake.expire_all()
    assert trio.run(_httpx_async_get, auth, url) == 200
    assert (fake.token_requests, fake.api_401s) == (4, 3)
    sweep.check()


def test_storm_cap_leaks_nothing(make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep) -> None:
    """An uncured 401 hits the storm cap, and the cap's error and records leak nothing."""
    auth = sweep.watch(make_auth())
    fake.reject_all = True
    with requests.Session() as session:
        statuses = [
            session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code for _ in range(8)
        ]
    assert statuses == [401] * 8
    assert fake.token_requests == edrv_auth._MAX_TOKEN_REQUESTS
    auth.clear()
    exc = sweep.error("storm cap", auth.get_token)
    assert "not requesting a token" in str(exc)
    assert fake.token_requests == edrv_auth._MAX_TOKEN_REQUESTS
    sweep.check()


def _failed_401_retry(fake: FakeEdrv, auth: edrv_auth.EdrvAuth) -> None:
    """Expire the token server-side and make the retry's token request fail (HTTP 400)."""
    auth.get_token()
    fake.expire_all()
    fake.queue_token_response(400, {"error": "invalid_client", "error_description": "revoked"})


def test_failed_401_retry_leaks_nothing(make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep) -> None:
    """A 401 whose retry cannot get a token raises, under requests and httpx, leaking nothing."""
    url = f"{fake.url}/v1.1/chargestations"
    calls: dict[str, Callable[[edrv_auth.EdrvAuth], object]] = {
        "requests": lambda auth: requests.get(url, auth=auth, timeout=5),
        "httpx sync": lambda auth: _httpx_sync_get(auth, url),
        "httpx asyncio": lambda auth: asyncio.run(_httpx_async_get(auth, url)),
        "httpx trio": lambda auth: trio.run(_httpx_async_get, auth, url),
    }
    for i, (name, call) in enumerate(calls.items()):
        auth = sweep.watch(make_auth(cache_dir=sweep.tmp_path / f"cache-{i}"))
        _failed_401_retry(fake, auth)
        exc = sweep.error(f"failed 401 retry, {name}", lambda: call(auth))  # noqa: B023
        assert (exc.status_code, exc.error) == (400, "invalid_client")
    assert (fake.token_requests, fake.api_401s) == (8, 4)
    sweep.check()


def test_failed_renewal_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep, clock: Clock
) -> None:
    """A failed renewal (kept token, then after expiry an error) leaks nothing, logged or raised."""
    auth = sweep.watch(make_auth())
    token = auth.get_token()
    clock.advance(fake.expires_in - 60)  # due, with a minute left: kept, with a WARNING
    echo = {"error": "invalid_client", "error_description": f"revoked {CLIENT_SECRET}"}
    fake.queue_token_response(400, echo)
    assert auth.get_token() == token  # renewed in the background, which fails
    finish_renewal(auth)
    clock.advance(61)
    fake.queue_token_response(400, {"error": "invalid_client", "error_description": "revoked"})
    exc = sweep.error("failed renewal", auth.get_token)
    assert exc.status_code == 400
    assert fake.token_requests == 3
    assert any("could not renew" in text for _, text in sweep.handler.records)
    sweep.check()


# ---- token endpoint failures ------------------------------------------------------------


def test_wrong_secret_echoed_by_the_endpoint_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """A 401/403 whose error_description echoes the sent secret never shows that secret."""
    fake.queue_token_response(
        401,
        {"error": "access_denied", "error_description": f"Unauthorized: secret {WRONG_SECRET}"},
    )
    wrong = sweep.watch(make_auth(client_secret=WRONG_SECRET))
    exc = sweep.error("wrong secret", wrong.get_token)
    assert (exc.status_code, exc.error) == (401, "access_denied")
    fake.queue_token_response(
        403,
        {
            "error": f"access_denied {CLIENT_SECRET}",
            "error_description": f"Service not enabled\nform: client_secret={CLIENT_SECRET}",
        },
    )
    right = sweep.watch(make_auth())
    exc = sweep.error(
        "403 echoing the secret", lambda: requests.get(fake.url + "/v1.1/x", auth=right, timeout=5)
    )
    assert exc.status_code == 403
    assert fake.token_requests == 2
    sweep.check()


def test_gateway_html_echoing_the_secret_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep, no_sleep: list[float]
) -> None:
    """A 502 HTML page echoing the form (secret included), retried 3 times, leaks nothing."""
    page = f"<html><body>502 Bad Gateway<pre>client_secret={CLIENT_SECRET}</pre></body></html>"
    for _ in range(3):
        fake.queue_token_response(502, page)
    auth = sweep.watch(make_auth())
    exc = sweep.error("502 gateway", auth.get_token)
    assert exc.status_code == 502
    assert (fake.token_requests, len(no_sleep)) == (3, 2)
    sweep.check()


def test_token_endpoint_down_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep, no_sleep: list[float]
) -> None:
    """A refused connection to the token endpoint, retried, leaks nothing."""
    auth = sweep.watch(make_auth(token_url=f"http://127.0.0.1:{_closed_port()}/oauth/token"))
    exc = sweep.error("endpoint down", auth.get_token)
    assert exc.status_code is None
    assert len(no_sleep) == 2
    sweep.check()


def test_token_endpoint_timeout_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep, no_sleep: list[float]
) -> None:
    """Three token requests that time out leak nothing."""
    for _ in range(3):
        fake.queue_token_response(200, {"echo": CLIENT_SECRET}, delay=0.5)
    auth = sweep.watch(make_auth(timeout=0.2))
    exc = sweep.error("timeout", auth.get_token)
    assert "timed out" in str(exc)
    assert (fake.token_requests, len(no_sleep)) == (3, 2)
    sweep.check()


MALFORMED_200_BODIES: list[bytes | str | dict[str, Any]] = [
    {"access_token": f"not a token {CLIENT_SECRET}", "token_type": "Bearer"},
    {"access_token": [CLIENT_SECRET]},
    {"access_token": "planted-token-one-4f2a", "token_type": f"mac {CLIENT_SECRET}\n"},
    {"access_token": "planted-token-two-9c3b", "token_type": [CLIENT_SECRET]},
    {"access_token": "planted-token-three-1d8e", "expires_in": CLIENT_SECRET},
    {"error": CLIENT_SECRET, "error_description": f"{CLIENT_SECRET}\r\n{CLIENT_SECRET}"},
    f"<html><form>client_secret={CLIENT_SECRET}</form></html>",
    f"grant_type=client_credentials&client_secret={CLIENT_SECRET}".encode(),
]


def test_malformed_200_bodies_holding_the_secret_leak_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep, tmp_path: Path
) -> None:
    """Each unusable 200 holding the secret is a TokenRequestError(200) that does not show it."""
    sweep.planted |= {
        "planted-token-one-4f2a",
        "planted-token-two-9c3b",
        "planted-token-three-1d8e",
    }
    for i, body in enumerate(MALFORMED_200_BODIES):
        fake.queue_token_response(200, body)
        # A cache folder each, so that the failed requests do not add up to the storm cap.
        auth = sweep.watch(make_auth(cache_dir=tmp_path / f"cache-{i}"))
        exc = sweep.error(f"malformed 200 #{i}", auth.get_token)
        assert exc.status_code == 200
    assert fake.token_requests == len(MALFORMED_200_BODIES)
    sweep.check()


# ---- cache file --------------------------------------------------------------------------


@pytest.mark.posix_only  # a file writable by others
def test_corrupt_or_untrusted_cache_file_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """Cache files holding the secret or a token, corrupt or writable by others, leak nothing."""
    auth = sweep.watch(make_auth())
    auth._describe().file_cache.ensure_dir()
    planted = fake.issue_token()
    corrupt = f'{{"version": 1, "token": {{"access_token": "{planted} {CLIENT_SECRET}"'
    auth._describe().file_cache.path.write_text(corrupt)
    auth._describe().file_cache.path.chmod(0o600)
    first = auth.get_token()
    assert first != planted
    # A well-formed file with a valid token, but writable by others: not trusted either.
    other = fake.issue_token()
    document = {
        "version": 1,
        "token": {
            "access_token": other,
            "obtained_at": edrv_auth._clock.time(),
            "expires_at": edrv_auth._clock.time() + 3600,
            "scope": CLIENT_SECRET,
        },
        "token_requests": [],
    }
    auth._describe().file_cache.path.write_text(json.dumps(document))
    auth._describe().file_cache.path.chmod(0o666)
    fresh = sweep.watch(make_auth())
    assert fresh.get_token() not in (planted, other)
    assert fake.token_requests == 2
    sweep.check()


def test_clear_leaks_nothing(make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep) -> None:
    """clear() after a fetch, and on a cleared cache, leaks nothing and forgets the token."""
    auth = sweep.watch(make_auth())
    token = auth.get_token()
    auth.clear()
    auth.clear()
    assert auth._describe().published is None
    assert auth.get_token() != token
    sweep.check()


def test_lock_timeout_and_unusable_cache_folder_leak_nothing(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    sweep: Sweep,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache lock held elsewhere (timeout) and a cache folder that is a file leak nothing."""
    auth = sweep.watch(make_auth())
    auth._describe().file_cache.ensure_dir()
    monkeypatch.setattr(edrv_auth, "_LOCK_TIMEOUT", 0.2)
    with filelock.FileLock(auth._describe().file_cache.lock_path):
        exc = sweep.error("lock timeout", auth.get_token)
    assert "timed out" in str(exc)
    assert fake.token_requests == 0
    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("")
    homeless = sweep.watch(make_auth(cache_dir=not_a_folder))
    assert homeless.get_token() in fake.issued_tokens
    assert fake.token_requests == 1
    sweep.check()


def test_configuration_errors_leak_nothing(
    fake: FakeEdrv, sweep: Sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Construction errors name the variables at fault, never the secret or the key given."""
    attempts: dict[str, Callable[[], object]] = {
        "key and credentials": lambda: edrv_auth.EdrvAuth("client", CLIENT_SECRET, api_key=API_KEY),
        "secret without id": lambda: edrv_auth.EdrvAuth(client_secret=CLIENT_SECRET),
        "bad refresh margin": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, refresh_margin=-1
        ),
        "bad timeout": lambda: edrv_auth.EdrvAuth("client", CLIENT_SECRET, timeout=0),
        "redis scheme": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, redis_url=f"http://user:{CLIENT_SECRET}@localhost:6379/0"
        ),
        "plain http": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, token_url="http://auth.example/oauth/token"
        ),
        "redis port": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, redis_url=f"redis://user:{CLIENT_SECRET}@localhost:port/0"
        ),
        "redis host": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, redis_url=f"rediss://:{CLIENT_SECRET}@/0"
        ),
        "redis_url from the environment, bad timeout": lambda: edrv_auth.EdrvAuth(
            "client", CLIENT_SECRET, timeout=-1
        ),
    }
    monkeypatch.setenv("EDRV_AUTH_REDIS_URL", f"redis://:{CLIENT_SECRET}@localhost:6379/0")
    for name, attempt in attempts.items():
        sweep.error(name, attempt)
    assert fake.token_requests == 0
    sweep.check(logged=False)


# ---- API-key mode and the origin guard -------------------------------------------------


def test_api_key_mode_with_a_401_leaks_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """In API-key mode a 401 reaches the caller unretried, and the key is never shown."""
    auth = sweep.watch(make_auth(client_id=None, client_secret=None, api_key=API_KEY))
    fake.queue_api_response(401, {"ok": False, "message": "invalid api key", "result": None})
    fake.queue_api_response(401, {"ok": False, "message": "invalid api key", "result": None})
    assert requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 401
    assert _httpx_sync_get(auth, f"{fake.url}/v1.1/x") == 401
    assert fake.api_auth_headers == [f"Bearer {API_KEY}"] * 2
    assert fake.token_requests == 0
    exc = sweep.error(
        "API key, other origin", lambda: requests.get("https://example.com/", auth=auth, timeout=5)
    )
    assert "refusing" in str(exc)
    sweep.check()


def test_origin_refusal_and_cross_origin_redirect_leak_nothing(
    make_auth: MakeAuth, fake: FakeEdrv, sweep: Sweep
) -> None:
    """Refusing another origin (even one whose URL holds the secret) and redirects leak nothing."""
    auth = sweep.watch(make_auth())
    port = fake.url.rsplit(":", 1)[1]
    elsewhere = f"http://localhost:{port}/v1.1/x"  # same server, other origin
    nosy = f"https://user:{CLIENT_SECRET}@evil.example/steal?secret={CLIENT_SECRET}"
    sweep.error("requests to another origin", lambda: requests.get(elsewhere, auth=auth, timeout=5))
    # The caller's own URL holds the canary here, so every frame holding it is the caller's doing.
    nosy_get = lambda: requests.get(nosy, auth=auth, timeout=5)  # noqa: E731
    sweep.error("requests to a nosy URL", nosy_get, frames=False)
    sweep.error("httpx to another origin", lambda: _httpx_sync_get(auth, elsewhere))
    sweep.error("httpx to a nosy URL", lambda: _httpx_sync_get(auth, nosy), frames=False)
    assert fake.api_requests == 0
    redirect = f"{fake.url}/redirect?to={elsewhere}&code=302"
    assert requests.get(redirect, auth=auth, timeout=5).status_code == 401
    with httpx.Client(auth=auth, follow_redirects=True) as client:
        assert client.get(redirect).status_code == 401
    # The redirected requests reached the other origin without the token.
    assert fake.api_auth_headers == [None, None]
    assert fake.token_requests == 1
    sweep.check()


# ---- command line -----------------------------------------------------------------------


def test_cli_leaks_nothing(
    fake_env: FakeEdrv,
    sweep: Sweep,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`token` (stderr), `status`, `clear` and a failing `token` leak nothing."""
    sweep.watch(edrv_auth.EdrvAuth())  # the CLI's cache file
    assert edrv_auth.main(["token"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() in fake_env.issued_tokens
    sweep.text("token stderr", err)
    for command in (["status"], ["clear"], ["status"]):
        assert edrv_auth.main(command) == 0
        out, err = capsys.readouterr()
        sweep.text(f"{command} stdout", out)
        sweep.text(f"{command} stderr", err)
    monkeypatch.setenv("EDRV_CLIENT_SECRET", WRONG_SECRET)
    fake_env.queue_token_response(
        401, {"error": "access_denied", "error_description": f"bad secret {WRONG_SECRET}"}
    )
    assert edrv_auth.main(["token"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("edrv_auth: token request to")
    sweep.text("failing token stderr", err)
    monkeypatch.delenv("EDRV_CLIENT_ID")
    monkeypatch.delenv("EDRV_CLIENT_SECRET")
    monkeypatch.setenv("EDRV_API_KEY", API_KEY)
    for command in (["status"], ["clear"]):
        assert edrv_auth.main(command) == 0
        out, err = capsys.readouterr()
        sweep.text(f"API key {command} stdout", out)
        sweep.text(f"API key {command} stderr", err)
    assert fake_env.token_requests == 2
    sweep.check()


# ---- a bug the sweep found ----------------------------------------------------------------


def test_scope_echoing_the_secret_stays_out_of_the_log(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """A 200 whose scope echoes the client secret does not put the secret in any log record."""
    body = {"access_token": "planted-scope-token-7a1c", "scope": f"read:x {CLIENT_SECRET}"}
    fake.queue_token_response(200, body)
    assert make_auth().get_token() == "planted-scope-token-7a1c"
    assert leak_watch.leaks() == []
    assert CLIENT_SECRET not in make_auth()._describe().file_cache.path.read_text()
