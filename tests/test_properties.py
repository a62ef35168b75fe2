"""Property tests: whatever the cache file or the token endpoint holds, only EdrvAuthError escapes.

Hypothesis feeds arbitrary bytes and near-valid documents to the cache file, and arbitrary
statuses, bodies and headers to the token endpoint (through the loopback fake, so urllib really
parses them), then checks that ``get_token()`` either returns a token it may return or raises
``EdrvAuthError``, that no message carries a secret or a control character, and that the small
pure helpers keep their bounds.

Settings are fixed for CI: ``derandomize=True`` and no example database, so that every run tries
the same examples (a flaky property is a bug); ``deadline=None``, since one example makes real
loopback requests whose latency varies. The two tests that talk to the fake run their
``@given`` function inside the test body: the fixtures (the fake, the clock, ``tmp_path``) are
then shared by all examples on purpose, each example resets what it uses (a fresh cache folder,
the fake's counters and queue), and the test can assert afterwards that every interesting branch
was reached.

The examples at the end of the file pin the bugs these properties found (integers too large
for a float, deeply nested JSON, a secret rebuilt around its mask), fixed since.
"""

from __future__ import annotations

import json
import math
import string
import tempfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT_SECRET, Clock, LeakWatch, MakeAuth, _plant, finish_renewal
from fake_edrv import FakeEdrv
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edrv_auth
from edrv_auth import EdrvAuthError, TokenRequestError

#: CI settings: reproducible (derandomize, no database), no per-example deadline. The autouse
#: fixtures (clean_env, leak_watch) are function-scoped and shared by every example, which is
#: safe here: the pure tests never touch them, and the fake-backed tests reset their state.
CI = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: The frozen clock of the cache-file property, so that expiry is exact.
NOW = 1_700_000_000.0
#: EdrvAuth's default refresh margin.
MARGIN = 300.0
#: The timeout of the instances under test: a token with more left outlives a renewal.
TIMEOUT = 2.0
#: Integers well beyond any float, which once overflowed `math.isfinite` in `_is_number`.
HUGE = 10**400


# ---- strategies ------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-HUGE, HUGE)
    | st.floats()  # NaN and ±inf included: json.dumps writes them as NaN/Infinity
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

planted_tokens = st.from_regex(r"planted-[A-Za-z0-9_-]{8,32}", fullmatch=True)


def _token_doc(access_token: str, age: float, remaining: float, scope: str) -> dict[str, Any]:
    return {
        "access_token": access_token,
        "obtained_at": NOW - age,
        "expires_at": NOW + remaining,
        "scope": scope,
    }


valid_token_docs = st.builds(
    _token_doc,
    planted_tokens,
    st.floats(0, 200_000),
    # Around the refresh margin (fresh, inside the margin, expired) and far from it.
    st.floats(0, MARGIN) | st.floats(-2 * MARGIN, 2 * MARGIN) | st.floats(-200_000, 200_000),
    st.text(max_size=20),
)
# Mixed inside and outside the 60 s window of the storm cap, up to 8 entries (the module keeps
# the last 5), or a full window.
request_lists = st.lists(st.floats(-5, 120).map(lambda ago: NOW - ago), max_size=8) | st.lists(
    st.floats(0, 59).map(lambda ago: NOW - ago), min_size=5, max_size=7
)


@st.composite
def _mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """Half the time `doc` unchanged; else each key kept, dropped or replaced, plus extra keys."""
    if not draw(st.booleans()):
        return doc
    out: dict[str, Any] = {}
    for key, value in doc.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if action == "keep":
            out[key] = value
        elif action == "replace":
            out[key] = draw(json_values)
    for key, value in draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)).items():
        out.setdefault(key, value)
    return out


@st.composite
def near_valid_cache_docs(draw: st.DrawFn) -> bytes:
    token = draw(st.one_of(st.none(), valid_token_docs, valid_token_docs))
    if token is not None:
        token = draw(_mutated(token))
    doc = {"version": 1, "token": token, "token_requests": draw(request_lists)}
    renewed_at = draw(st.none() | st.just("absent") | st.floats(-5, 120).map(lambda ago: NOW - ago))
    if renewed_at != "absent":
        doc["renewed_at"] = renewed_at
    doc = draw(_mutated(doc))
    raw = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:  # now and then, a truncated write
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


cache_contents = st.binary(max_size=2000) | near_valid_cache_docs()


def _cache_doc(remaining: float | None, requests_ago: list[float]) -> bytes:
    """A valid cache file: a token `remaining` s from expiry (or none), and request times."""
    token = None if remaining is None else _token_doc("planted-example-token", 3600, remaining, "")
    times = [NOW - ago for ago in requests_ago]
    return json.dumps({"version": 1, "token": token, "token_requests": times}).encode()


FULL_WINDOW = [50.0, 40.0, 30.0, 20.0, 10.0]

secretish = st.builds(
    lambda before, after: before + CLIENT_SECRET + after, st.text(max_size=10), st.text(max_size=10)
)
huge_text = st.builds(
    lambda unit, n: unit * n, st.text(min_size=1, max_size=4), st.integers(200, 4000)
)
nasty_text = (
    st.text(max_size=30)
    | secretish
    | huge_text
    | st.sampled_from(["line\nbreak", "\x00\x1b[31mred", "tab\there", "\u2028sep", "\r\n\r\n", ""])
)
canned_tokens = st.from_regex(r"issued-[A-Za-z0-9._~+/=-]{8,40}", fullmatch=True)
token_bodies = st.fixed_dictionaries(
    {},
    optional={
        "access_token": canned_tokens | nasty_text | json_values,
        "expires_in": st.integers(-10, 10**6) | st.integers(-HUGE, HUGE) | st.floats() | nasty_text,
        "token_type": st.sampled_from(["Bearer", "bearer", "BEARER", "mac"]) | nasty_text,
        # No secret here: a scope echoing the secret is logged (test_leaks.py pins that bug).
        "scope": st.text(max_size=20),
        "error": nasty_text | json_values,
        "error_description": nasty_text | json_values,
    },
)
valid_token_bodies = st.fixed_dictionaries(
    {"access_token": canned_tokens},
    optional={
        "expires_in": st.integers(1, 10**9) | st.floats(0.001, 1e12),
        "token_type": st.sampled_from(["Bearer", "bearer", "BEARER"]),
        "scope": st.text(max_size=20),
    },
)
bodies = (
    st.binary(max_size=300)
    | token_bodies
    | st.builds(lambda text: f"<html><body>{text}</body></html>", nasty_text)
)
# Header values the fake can put on the wire: latin-1 (http.server encodes headers so) and no CR
# or LF, which would split the header and corrupt the fake's own framing.
header_values = st.text(
    st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n"), max_size=40
)
retry_after_values = (
    header_values
    | st.integers(0, 10**12).map(str)
    | st.datetimes(timezones=st.just(timezone.utc)).map(format_datetime)
)
# Not "Connection": `Connection: keep-alive` would make the fake keep the socket open, so a
# chunked or short answer would wait for the client's timeout (the fake's behaviour, not ours).
headers = st.dictionaries(
    st.sampled_from(
        ["Content-Type", "Transfer-Encoding", "Content-Encoding", "Location", "WWW-Authenticate"]
    ),
    header_values,
    max_size=2,
) | st.fixed_dictionaries({"Retry-After": retry_after_values})
# The fake sends only final statuses, 200..599 (`_make_canned` refuses others); a 1xx can never be
# a final answer anyway, since http.client skips interim responses and waits for the next one.
statuses = st.integers(200, 599) | st.sampled_from(
    [200, 201, 204, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 429, 500, 502, 503, 504]
)
answers = st.tuples(statuses, bodies) | st.tuples(st.sampled_from([200, 201]), valid_token_bodies)


# ---- helpers -----------------------------------------------------------------


def _fresh_example(fake: FakeEdrv, tmp_path: Path) -> Path:
    """Reset the shared fake for one example and return a new, empty cache folder.

    A fresh folder per example keeps the storm cap's request record (kept in the cache file)
    from leaking from one example into the next. Responses queued but not consumed by the last
    example are dropped.
    """
    fake.clear_queues()
    fake.reset_counters()
    return Path(tempfile.mkdtemp(dir=tmp_path))


def _check_message(exc: BaseException, leak_watch: LeakWatch) -> None:
    text = str(exc)
    assert leak_watch.leaks(text, repr(exc)) == []
    assert all(ch.isprintable() for ch in text), repr(text)
    assert len(text) < 600


# ---- 1. the cache file ---------------------------------------------------------


def _outcome(auth: edrv_auth.EdrvAuth) -> str | EdrvAuthError:
    """get_token's token, or the EdrvAuthError it raised (anything else propagates)."""
    try:
        return auth.get_token()
    except EdrvAuthError as exc:
        return exc


def test_any_cache_file_content_gives_a_token_or_edrv_auth_error(
    make_auth: MakeAuth, fake: FakeEdrv, clock: Clock, tmp_path: Path, leak_watch: LeakWatch
) -> None:
    """Any cache file content yields the planted token (fresh, or due and renewed in the
    background), a fresh one, or EdrvAuthError."""
    clock.now = NOW
    seen: Counter[str] = Counter()

    @settings(CI, max_examples=200)
    @given(raw=cache_contents)
    @example(raw=_cache_doc(86_400, []))  # planted, fresh
    @example(raw=_cache_doc(100, FULL_WINDOW))  # due, renewed in the background: capped
    @example(raw=_cache_doc(1.5, FULL_WINDOW))  # capped, planted kept within its timeout
    @example(raw=_cache_doc(-1, FULL_WINDOW))  # capped, planted expired: error
    @example(raw=_cache_doc(None, [70.0, *FULL_WINDOW[1:]]))  # one request left the window
    def check(raw: bytes) -> None:
        directory = _fresh_example(fake, tmp_path)
        auth = make_auth(cache_dir=directory, timeout=TIMEOUT)
        _plant(auth._describe().file_cache.path, raw)
        expected = edrv_auth._parse_record(raw)
        assert auth._describe().file_cache.read() == expected
        token = expected.token if expected else None
        if token is not None and token.access_token.value.startswith("planted-"):
            leak_watch.secrets.add(token.access_token.value)  # distinctive: searched for in logs
        recent = expected.counted_times(NOW) if expected else ()  # what the storm cap counts
        capped = len(recent) >= edrv_auth._MAX_TOKEN_REQUESTS
        result = _outcome(auth)
        finish_renewal(auth)  # one started in the background ends within its example
        if isinstance(result, EdrvAuthError):
            _check_message(result, leak_watch)
            # The only error possible here: the planted record says the cap is reached, and the
            # planted token (if any) has expired.
            assert isinstance(result, TokenRequestError)
            assert result.status_code is None
            assert len(recent) >= edrv_auth._MAX_TOKEN_REQUESTS
            assert token is None or token.expires_at <= NOW
            assert fake.token_requests == 0
            seen["capped, error"] += 1
        elif token is not None and token.refresh_at(MARGIN) > NOW:
            assert (result, fake.token_requests) == (token.access_token.value, 0)
            seen["planted, fresh"] += 1
        elif token is not None and token.expires_at - TIMEOUT > NOW:
            # Due, and it outlives a renewal: sent while one replaces it in the background.
            assert result == token.access_token.value
            assert fake.token_requests == (0 if capped else 1)
            seen["planted, due"] += 1
        elif capped:
            assert token is not None
            assert token.expires_at > NOW
            assert (result, fake.token_requests) == (token.access_token.value, 0)
            seen["capped, planted kept"] += 1
        else:
            assert result in fake.issued_tokens
            assert fake.token_requests == 1
            seen["fetched"] += 1

    check()
    assert set(seen) == {
        "planted, fresh",
        "planted, due",
        "capped, planted kept",
        "capped, error",
        "fetched",
    }


# ---- 2. the token endpoint -------------------------------------------------------


def test_any_token_endpoint_answer_gives_a_token_or_token_request_error(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    tmp_path: Path,
    leak_watch: LeakWatch,
    no_sleep: list[float],
) -> None:
    """Any token endpoint answer yields a token or a clean, secret-free TokenRequestError."""
    seen: Counter[str] = Counter()

    @settings(CI, max_examples=150)
    @given(answer=answers, extra_headers=headers)
    # Statuses that carry no body, or would redirect, with what would otherwise be a good token.
    @example(answer=(204, {"access_token": "issued-no-content"}), extra_headers={})
    @example(answer=(304, {"access_token": "issued-not-modified"}), extra_headers={})
    @example(answer=(302, {"access_token": "issued-redirect"}), extra_headers={"Location": "/"})
    # A chunked answer whose body is not chunked: http.client fails while reading it.
    @example(
        answer=(200, {"access_token": "issued-bad-chunks"}),
        extra_headers={"Transfer-Encoding": "chunked"},
    )
    def check(answer: tuple[int, Any], extra_headers: dict[str, str]) -> None:
        status, body = answer
        directory = _fresh_example(fake, tmp_path)
        no_sleep.clear()
        planted = body.get("access_token") if isinstance(body, dict) else None
        if isinstance(planted, str) and planted.startswith("issued-"):
            leak_watch.secrets.add(planted)
        for _ in range(edrv_auth._MAX_ATTEMPTS):  # retries see the same answer
            fake.queue_token_response(status, body, extra_headers)
        result = _outcome(make_auth(cache_dir=directory, timeout=2))
        status_code: int | None = status
        if isinstance(result, EdrvAuthError):
            _check_message(result, leak_watch)
            assert isinstance(result, TokenRequestError)
            status_code = result.status_code
            if status_code is None:
                # Only when http.client could not read the answer (bad framing).
                assert "malformed or incomplete answer" in str(result)
                seen["unparsable answer"] += 1
            else:
                assert status_code == status
                seen[f"{status // 100}xx error"] += 1
        else:
            assert 200 <= status < 300
            assert status != 204  # a 204 has no body, hence no token
            assert result == planted
            assert edrv_auth._TOKEN_CHARS.fullmatch(result)
            seen["token"] += 1
        attempts = fake.token_requests
        assert attempts == len(no_sleep) + 1
        assert all(0 <= delay <= edrv_auth._RETRY_AFTER_CAP for delay in no_sleep)
        if status_code is None:
            # Unreadable answers are retried like connection errors.
            assert attempts == edrv_auth._MAX_ATTEMPTS
        elif status != 429 and status < 500:
            assert attempts == 1
        elif "Retry-After" not in extra_headers:
            assert attempts == edrv_auth._MAX_ATTEMPTS
        else:
            assert 1 <= attempts <= edrv_auth._MAX_ATTEMPTS

    check()
    assert set(seen) == {
        "token",
        "2xx error",
        "3xx error",
        "4xx error",
        "5xx error",
        "unparsable answer",
    }


# ---- 3. pure helpers ---------------------------------------------------------------


@CI
@given(
    value=st.none()
    | st.text()
    | st.integers(-5, 10**12).map(str)
    | st.datetimes(timezones=st.just(timezone.utc)).map(format_datetime)
    | st.datetimes().map(lambda moment: format_datetime(moment, usegmt=False))
)
def test_retry_after_is_none_or_a_finite_non_negative_float(value: str | None) -> None:
    """_retry_after never raises and returns None or a finite float >= 0."""
    result = edrv_auth._retry_after(value)
    if result is not None:
        assert isinstance(result, float)
        assert math.isfinite(result)
        assert result >= 0
    if value is not None and value.isascii() and value.isdigit() and len(value) <= 9:
        assert result == float(value)


def test_retry_after_future_http_date_is_its_distance() -> None:
    """A Retry-After HTTP date 120 s ahead reads as about 120 s."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=120)
    result = edrv_auth._retry_after(format_datetime(moment, usegmt=True))
    assert result is not None
    assert 110 <= result <= 121


@CI
@given(
    attempt=st.integers(1, 10**6),
    retry_after=st.none() | st.floats(0, 10**9) | st.integers(0, 10**9).map(float),
)
def test_backoff_stays_within_bounds(attempt: int, retry_after: float | None) -> None:
    """_backoff is a jittered delay in (0, 5] without Retry-After, else min(Retry-After, 10)."""
    delay = edrv_auth._backoff(attempt, retry_after)
    if retry_after is None:
        assert 0 < delay <= edrv_auth._BACKOFF_CAP
    else:
        assert delay == min(retry_after, edrv_auth._RETRY_AFTER_CAP)


# Client secrets as issued (Auth0-style: letters, digits and a few URL-safe signs); the overlap
# counterexamples for secrets containing "*" or a space are pinned by test_clean_... below.
realistic_secrets = st.text(string.ascii_letters + string.digits + "-_.~", min_size=4, max_size=40)


def _redactor(secret: str) -> edrv_auth._Redactor:
    return edrv_auth._Redactor("test-client-id", edrv_auth._Secret(secret))


@st.composite
def texts_around(draw: st.DrawFn, secret: str) -> str:
    """Arbitrary text interleaved with copies, overlaps and fragments of `secret`."""
    pieces = (
        st.text(max_size=10)
        | st.just(secret)
        | st.sampled_from(
            [secret[:-1], secret[1:], secret[: len(secret) // 2], secret + secret[1:]]
        )
    )
    return "".join(draw(st.lists(pieces, max_size=8)))


@CI
@given(data=st.data(), secret=realistic_secrets, limit=st.integers(0, 300))
def test_clean_hides_the_secret_and_control_characters(
    data: st.DataObject, secret: str, limit: int
) -> None:
    """_clean output never holds the secret, has only printable characters, and is <= limit+3."""
    text = data.draw(texts_around(secret))
    result = edrv_auth._clean(text, _redactor(secret), limit=limit)
    assert secret not in result
    assert all(ch.isprintable() for ch in result)
    assert len(result) <= limit + 3


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("p4ss-worp4ss-wor*", "p4ss-wor*"),  # residue + "***" spells the secret again
        ("p4ss\two rd", "p4ss wo rd"),  # the tab becomes a space after masking
    ],
)
def test_clean_never_assembles_the_secret(text: str, secret: str) -> None:
    """_clean hides a secret with '*' or a space even when the text forms it around the mask."""
    assert secret not in edrv_auth._clean(text, _redactor(secret))


@CI
@given(
    url=st.text()
    | st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["http", "https", "HTTP", "HtTpS", "ftp", "", "javascript"]),
        st.text(max_size=20) | st.sampled_from(["API.EDRV.io", "127.0.0.1", "[::1]", "[::1", ""]),
        st.sampled_from(["", ":0", ":443", ":65535", ":65536", ":-1", ":x", ":"])
        | st.integers(-10, 99999).map(lambda n: f":{n}"),
        st.text(max_size=10),
    )
)
def test_origin_is_a_value_error_or_a_normalised_triple(url: str) -> None:
    """_origin raises ValueError or gives (http|https, lowercase non-empty host, port 1..65535)."""
    try:
        scheme, host, port = edrv_auth._origin(url)
    except ValueError:
        return
    assert scheme in {"http", "https"}
    assert host
    assert host == host.lower()
    assert isinstance(port, int)
    assert 1 <= port <= 65535


# ---- bugs the properties above found, pinned --------------------------------------------------


def test_huge_integer_in_cache_file_is_ignored(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """A cache file whose request times hold a 400-digit integer is ignored and replaced."""
    auth = make_auth(timeout=2)
    auth._describe().file_cache.ensure_dir()
    huge = b"1" + b"0" * 400
    _plant(
        auth._describe().file_cache.path,
        b'{"version": 1, "token": null, "token_requests": [' + huge + b"]}",
    )
    assert auth._describe().file_cache.read() is None
    assert auth.get_token() in fake.issued_tokens


def test_deeply_nested_cache_file_is_ignored(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """A cache file of 5000 nested arrays is ignored and replaced by a fresh token."""
    auth = make_auth(timeout=2)
    auth._describe().file_cache.ensure_dir()
    _plant(auth._describe().file_cache.path, b"[" * 5000)
    assert auth._describe().file_cache.read() is None
    assert auth.get_token() in fake.issued_tokens


def test_huge_integer_expires_in_is_a_token_request_error(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """A 200 whose expires_in is a 400-digit integer is refused like `Infinity`: no float holds
    it, so it is no usable lifetime (a huge float, 1e12, is clamped instead)."""
    leak_watch.secrets.add("issued-abcdefgh")
    body = b'{"access_token": "issued-abcdefgh", "expires_in": 1' + b"0" * 400 + b"}"
    fake.queue_token_response(200, body, {"Content-Type": "application/json"})
    with pytest.raises(TokenRequestError, match="invalid expires_in") as info:
        make_auth(timeout=2).get_token()
    assert info.value.status_code == 200
    _check_message(info.value, leak_watch)
    assert fake.token_requests == 1


@pytest.mark.parametrize("status", [200, 401, 502])
def test_deeply_nested_token_body_is_a_token_request_error(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], status: int
) -> None:
    """A token endpoint body of 5000 nested arrays gives TokenRequestError with its status."""
    for _ in range(edrv_auth._MAX_ATTEMPTS):
        fake.queue_token_response(status, b"[" * 5000, {"Content-Type": "application/json"})
    with pytest.raises(TokenRequestError) as info:
        make_auth(timeout=2).get_token()
    assert info.value.status_code == status
