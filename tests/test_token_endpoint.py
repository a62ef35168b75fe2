"""Token endpoint failures and secret hygiene in their errors.

Every test drives ``EdrvAuth.get_token()`` against the loopback fake and injects the
failure through the fake itself (canned responses, dropped connections, delays), so
the real token request (httpx), its deadline and its refusal to follow a redirect
are exercised.
Backoff sleeps are recorded by ``no_sleep`` instead of slept; the storm cap's
window is crossed with the ``clock`` fixture.
"""

from __future__ import annotations

import email.utils
import json
import re
import urllib.parse
from typing import Any

import pytest
from conftest import CLIENT_ID, CLIENT_SECRET, Clock, LeakWatch, MakeAuth, _closed_port
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuthError, TokenRequestError

WRONG_SECRET = "test-wrong-secret"


def _fails(auth: edrv_auth.EdrvAuth, leak_watch: LeakWatch) -> TokenRequestError:
    """Call get_token, expect TokenRequestError, and check its str/repr carry no secret."""
    with pytest.raises(TokenRequestError) as info:
        auth.get_token()
    exc = info.value
    assert leak_watch.leaks(str(exc), repr(exc)) == []
    return exc


def _cached_lifetime(auth: edrv_auth.EdrvAuth) -> float:
    """expires_at - obtained_at of the token in the cache file, read as raw JSON."""
    token = json.loads(auth._describe().file_cache.path.read_text())["token"]
    return float(token["expires_at"] - token["obtained_at"])


# ---- the request itself ----------------------------------------------------


def test_token_request_is_a_client_credentials_form(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """The token request is one POSTed form with grant_type, client_id, client_secret, audience."""
    token = make_auth().get_token()
    assert token in fake.issued_tokens
    assert fake.token_forms == [
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "audience": "https://api.edrv.io",
        }
    ]


# ---- 4xx: final ------------------------------------------------------------


def test_wrong_secret_is_not_retried_and_names_the_variable(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A wrong secret: TokenRequestError(401, access_denied) naming EDRV_CLIENT_SECRET, 1 try."""
    leak_watch.secrets.add(WRONG_SECRET)
    exc = _fails(make_auth(client_secret=WRONG_SECRET), leak_watch)
    assert exc.status_code == 401
    assert exc.error == "access_denied"
    assert "EDRV_CLIENT_SECRET" in str(exc)
    assert fake.token_requests == 1
    assert no_sleep == []


def test_invalid_request_is_not_retried(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A 400 invalid_request is final: one request, TokenRequestError(400, invalid_request)."""
    fake.queue_token_response(400, {"error": "invalid_request", "error_description": "bad form"})
    exc = _fails(make_auth(), leak_watch)
    assert (exc.status_code, exc.error) == (400, "invalid_request")
    assert "bad form" in str(exc)
    assert fake.token_requests == 1
    assert no_sleep == []


# ---- transient failures: retried with backoff -------------------------------


def _queue_failure(fake: FakeEdrv, kind: str) -> None:
    if kind == "500":
        fake.queue_token_response(500, {"error": "server_error", "error_description": "oops"})
    elif kind == "502-html":
        fake.queue_token_response(502, "<html><body><h1>502 Bad Gateway</h1></body></html>")
    elif kind == "503":
        fake.queue_token_response(503, b"", {"Content-Type": "text/plain"})
    elif kind == "429":
        fake.queue_token_response(429, {"error": "too_many_requests"})
    elif kind == "drop":
        fake.queue_token_drop()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "status"),
    [("500", 500), ("502-html", 502), ("503", 503), ("429", 429), ("drop", None)],
)
def test_transient_failure_is_retried_three_times(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    leak_watch: LeakWatch,
    no_sleep: list[float],
    kind: str,
    status: int | None,
) -> None:
    """5xx, 429 and dropped connections are tried 3 times with growing backoff, then raised."""
    for _ in range(3):
        _queue_failure(fake, kind)
    exc = _fails(make_auth(), leak_watch)
    assert exc.status_code == status
    assert re.search(r"\(3 attempts over \d+\.\d s, each limited to 10 s\)$", str(exc))
    assert fake.token_requests == 3
    assert len(no_sleep) == 2
    assert 0 < no_sleep[0] < no_sleep[1]


def test_failure_message_says_how_many_attempts_over_how_long() -> None:
    """The last attempt's error, with the attempts and the time they took: `timeout` bounds
    each attempt, not the whole request. A single attempt says nothing more."""
    last = TokenRequestError("the token endpoint did not answer in time", None, None)
    error = edrv_auth._after_attempts(last, 3, 20.84, 10.0)
    assert str(error) == (
        "the token endpoint did not answer in time (3 attempts over 20.8 s, each limited to 10 s)"
    )
    assert (error.status_code, error.error) == (None, None)
    final = TokenRequestError("HTTP 401 access_denied", 401, "access_denied")
    assert edrv_auth._after_attempts(final, 1, 0.1, 10.0) is final


def test_timeout_is_retried_three_times(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A token endpoint slower than the timeout is tried 3 times, then TokenRequestError(None)."""
    fake.token_delay = 0.5
    exc = _fails(make_auth(timeout=0.3), leak_watch)
    assert exc.status_code is None
    assert "timed out" in str(exc)
    assert fake.token_requests == 3
    assert len(no_sleep) == 2
    assert 0 < no_sleep[0] < no_sleep[1]


@pytest.mark.parametrize("kind", ["500", "502-html", "503", "429", "drop"])
def test_single_transient_failure_then_success(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], kind: str
) -> None:
    """One transient failure followed by success yields a token after 2 requests and one sleep."""
    _queue_failure(fake, kind)
    token = make_auth().get_token()
    assert token in fake.issued_tokens
    assert fake.token_requests == 2
    assert len(no_sleep) == 1
    assert no_sleep[0] > 0


def test_retry_after_seconds_is_honoured(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float]
) -> None:
    """A 429 with Retry-After: 2 makes the retry wait exactly 2 s."""
    fake.queue_token_response(429, {"error": "too_many_requests"}, {"Retry-After": "2"})
    make_auth().get_token()
    assert no_sleep == [2.0]
    assert fake.token_requests == 2


def test_retry_after_http_date_is_honoured(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], clock: Clock
) -> None:
    """A 429 whose Retry-After is an HTTP date 3 s ahead makes the retry wait about 3 s."""
    when = email.utils.formatdate(clock.now + 3, usegmt=True)  # whole seconds: 2 < wait <= 3
    fake.queue_token_response(429, {"error": "too_many_requests"}, {"Retry-After": when})
    make_auth().get_token()
    assert len(no_sleep) == 1
    assert 2.0 < no_sleep[0] <= 3.0
    assert fake.token_requests == 2


def test_long_retry_after_is_not_waited_for(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A 429 asking to wait an hour is raised at once as TokenRequestError(429), not retried."""
    fake.queue_token_response(429, {"error": "too_many_requests"}, {"Retry-After": "3600"})
    exc = _fails(make_auth(), leak_watch)
    assert exc.status_code == 429
    assert fake.token_requests == 1
    assert no_sleep == []


def test_garbage_retry_after_is_ignored(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float]
) -> None:
    """A 503 with a garbage Retry-After ('\u00b2') falls back to normal backoff, then succeeds."""
    fake.queue_token_response(503, {"error": "temporarily_unavailable"}, {"Retry-After": "\u00b2"})
    token = make_auth().get_token()
    assert token in fake.issued_tokens
    assert fake.token_requests == 2
    assert len(no_sleep) == 1
    assert 0 < no_sleep[0] <= 1.0


# ---- 200 answers that are not a usable token --------------------------------


_GOOD: dict[str, Any] = {"access_token": "fake-token-canned-ok", "token_type": "Bearer"}


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Welcome to the proxy</body></html>",
        {"token_type": "Bearer", "expires_in": 3600},
        {**_GOOD, "access_token": 12345},
        {**_GOOD, "access_token": ""},
        {**_GOOD, "access_token": "fake-token with-space"},
        {**_GOOD, "access_token": "fake-token\nwith-newline"},
        {**_GOOD, "expires_in": 0},
        {**_GOOD, "expires_in": -60},
        {**_GOOD, "expires_in": "3600"},
        {**_GOOD, "expires_in": True},
        b'{"access_token": "fake-token-canned-ok", "expires_in": NaN}',
        b'{"access_token": "fake-token-canned-ok", "expires_in": Infinity}',
        {**_GOOD, "expires_in": 3600, "token_type": "mac"},
    ],
    ids=[
        "html",
        "no-access-token",
        "token-not-string",
        "token-empty",
        "token-space",
        "token-newline",
        "expires-zero",
        "expires-negative",
        "expires-string",
        "expires-bool",
        "expires-nan",
        "expires-infinity",
        "token-type-mac",
    ],
)
def test_unusable_200_is_an_error(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    leak_watch: LeakWatch,
    no_sleep: list[float],
    body: bytes | str | dict[str, Any],
) -> None:
    """A 200 without a usable Bearer token or positive expires_in raises and caches nothing."""
    leak_watch.secrets.update({"fake-token-canned-ok", "fake-token with-space"})
    fake.queue_token_response(200, body)
    auth = make_auth()
    _fails(auth, leak_watch)
    assert fake.token_requests == 1
    state = auth._describe().file_cache.read()
    assert state is None or state.token is None


def test_answer_is_read_up_to_64_kib_only(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A token answer over 64 KiB is cut there, not read whole (a misbehaving gateway could
    send gigabytes): cut, it is no JSON token, and says so. Just under the cap, it works."""
    json_type = {"Content-Type": "application/json"}
    padding = " " * (64 * 1024)
    leak_watch.secrets.add("fake-token-huge")
    huge = '{"access_token": "fake-token-huge"' + padding + "}"
    fake.queue_token_response(200, huge, json_type)
    error = _fails(make_auth(), leak_watch)
    assert "answered application/json, not a JSON token" in str(error)
    fits = '{"access_token": "fake-token-fits"' + padding[:60_000] + "}"
    fake.queue_token_response(200, fits, json_type)
    assert make_auth().get_token() == "fake-token-fits"


@pytest.mark.parametrize(
    ("extra", "lifetime"),
    [({}, 3600.0), ({"expires_in": 1e12}, 30 * 86400.0)],
    ids=["expires-absent-defaults-to-3600", "expires-huge-clamped-to-30-days"],
)
def test_expires_in_default_and_clamp(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    leak_watch: LeakWatch,
    extra: dict[str, Any],
    lifetime: float,
) -> None:
    """A missing expires_in means 3600 s and a huge one is clamped to 30 days, in the cache file."""
    leak_watch.secrets.add("fake-token-canned-ok")
    fake.queue_token_response(200, {**_GOOD, **extra})
    auth = make_auth()
    assert auth.get_token() == "fake-token-canned-ok"
    assert fake.token_requests == 1
    assert _cached_lifetime(auth) == lifetime


def test_unusable_200_reports_its_status(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """A TokenRequestError for an unusable 200 answer carries status_code 200, not None."""
    fake.queue_token_response(200, {"token_type": "Bearer", "expires_in": 3600})
    exc = _fails(make_auth(), leak_watch)
    assert exc.status_code == 200


# ---- what error messages may contain ----------------------------------------


def test_error_description_is_sanitised(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """An error_description with the secret, a newline and 1000 chars is masked and capped."""
    description = f"client_secret {CLIENT_SECRET} is wrong\n\x1b[31m" + "x" * 1000
    fake.queue_token_response(400, {"error": "invalid_request", "error_description": description})
    exc = _fails(make_auth(), leak_watch)
    message = str(exc)
    assert "***" in message
    assert CLIENT_SECRET not in message
    assert [ch for ch in message if not ch.isprintable()] == []
    assert len(message) < 400


def test_proxy_echoing_the_form_is_not_quoted(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A 502 HTML page echoing the form puts neither the secret nor the HTML in the error."""
    form = urllib.parse.urlencode({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    page = f"<html><body><h1>Bad Gateway</h1><pre>{form}</pre></body></html>"
    for _ in range(3):
        fake.queue_token_response(502, page)
    exc = _fails(make_auth(), leak_watch)
    assert exc.status_code == 502
    for text in (str(exc), repr(exc)):
        assert CLIENT_SECRET not in text
        assert "<html" not in text
        assert "Bad Gateway" not in text


# ---- refused connections and the storm cap ----------------------------------


def test_refused_connection_does_not_count_towards_the_cap(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, no_sleep: list[float]
) -> None:
    """A refused connection raises "could not reach" and never counts towards the cap."""
    auth = make_auth(token_url=f"http://127.0.0.1:{_closed_port()}/oauth/token")
    for call in range(1, 11):
        exc = _fails(auth, leak_watch)
        assert "could not reach" in str(exc)
        assert exc.status_code is None
        assert len(no_sleep) == 2 * call  # all 3 attempts made again, every call
    assert fake.token_requests == 0


def test_storm_cap_on_failing_token_requests(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, clock: Clock
) -> None:
    """5 rejected token requests a minute at most; the 6th call sends nothing until 60 s pass."""
    leak_watch.secrets.add(WRONG_SECRET)
    auth = make_auth(client_secret=WRONG_SECRET)
    for call in range(1, 6):
        assert _fails(auth, leak_watch).status_code == 401
        assert fake.token_requests == call
    capped = _fails(auth, leak_watch)
    assert "not requesting a token" in str(capped)
    assert capped.status_code is None
    assert fake.token_requests == 5
    other_instance = make_auth(client_secret=WRONG_SECRET)  # the cap lives in the shared file
    assert "not requesting a token" in str(_fails(other_instance, leak_watch))
    assert fake.token_requests == 5
    clock.advance(61)
    assert _fails(auth, leak_watch).status_code == 401
    assert fake.token_requests == 6


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_from_token_endpoint_is_not_followed(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, code: int
) -> None:
    """A 3xx from the token endpoint is an error, and the other server it names gets nothing."""
    other = FakeEdrv(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    try:
        # 307/308 would re-POST the form (secret included) to the target; urllib turns
        # 301-303 into a GET, which the fake counts only on its API paths.
        target = other.token_url if code in (307, 308) else other.url + "/v1.1/redirected"
        fake.queue_token_response(code, b"", {"Location": target})
        exc = _fails(make_auth(), leak_watch)
        assert exc.status_code == code
        assert fake.token_requests == 1
        assert other.counts() == {
            "token_requests": 0,
            "tokens_issued": 0,
            "api_requests": 0,
            "api_401s": 0,
        }
    finally:
        other.stop()
        leak_watch.secrets.update(other.issued_tokens)


# ---- plain http only on loopback ---------------------------------------------


@pytest.mark.parametrize("option", ["token_url", "api_url"])
@pytest.mark.parametrize(
    "url",
    [
        "http://auth.edrv.io/oauth/token",
        "http://10.0.0.1:8080/oauth/token",
        "http://localhost.evil.example/oauth/token",
        "http://127.0.0.1.evil.example/oauth/token",
    ],
)
def test_plain_http_to_a_remote_host_is_refused(
    make_auth: MakeAuth, leak_watch: LeakWatch, option: str, url: str
) -> None:
    """An http:// token_url or api_url whose host is not loopback is refused at construction."""
    with pytest.raises(EdrvAuthError) as info:
        make_auth(**{option: url})
    assert "https" in str(info.value)
    assert leak_watch.leaks(str(info.value), repr(info.value)) == []


@pytest.mark.parametrize("option", ["token_url", "api_url"])
@pytest.mark.parametrize(
    "url", ["http://localhost:8080/oauth/token", "http://127.0.0.1:81/x", "http://[::1]:9/x"]
)
def test_plain_http_to_loopback_is_accepted(
    make_auth: MakeAuth, fake: FakeEdrv, option: str, url: str
) -> None:
    """An http:// token_url or api_url on localhost, 127.0.0.1 or [::1] is accepted."""
    auth = make_auth(**{option: url})
    assert isinstance(auth, edrv_auth.EdrvAuth)
    assert fake.token_requests == 0
