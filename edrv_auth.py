"""edrv_auth: authentication for the eDRV API with requests and httpx.

One object, :class:`EdrvAuth`, authenticates requests to the eDRV API. With an
eDRV API key it sends the key. With client credentials it fetches an access
token when first needed, saves it in a private per-user cache file that every
process on the machine shares, refreshes it shortly before it expires, and
renews it once, transparently, when the API answers ``401 jwt expired``. eDRV
treats excessive token requests as misuse, so the module asks for as few
tokens as possible::

    import requests, httpx
    from edrv_auth import EdrvAuth

    auth = EdrvAuth()   # $EDRV_API_KEY, or $EDRV_CLIENT_ID and $EDRV_CLIENT_SECRET
    requests.get("https://api.edrv.io/v1.1/chargestations", auth=auth)
    with httpx.Client(auth=auth) as client:
        client.get("https://api.edrv.io/v1.1/chargestations")

The file is self-contained: copy it next to a script and it works with whichever
of requests and httpx is installed (client credentials need ``httpx``, for the
token request, and ``filelock``).
"""

# The file's sections, each built only from the ones above it:
#     Errors · Token values · Token endpoint (the one token request) ·
#     Shared caches (file, Redis) · Token source (every token decision) ·
#     Configuration · Adapters' helpers (origin guard, the 401 policy) ·
#     EdrvAuth (configuration and the three adapters) · Command line

from __future__ import annotations

import _thread
import atexit
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import socket
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeGuard

# Only what a warm process needs is imported up front: filelock, urllib.request,
# argparse and email load on the slow paths that use them (a token request, a
# lock, the command line), which keeps `import edrv_auth` cheap.
if TYPE_CHECKING:
    import asyncio
    import ssl
    from typing import Protocol

    import anyio
    import filelock
    import httpx
    import requests
    from httpx import Auth as _HttpxAuthBase
    from requests.auth import AuthBase as _RequestsAuthBase
else:
    # The module must import when vendored next to a script whose
    # environment lacks one of the two clients. Each fallback is a distinct empty
    # class, since two `object` bases would be a duplicate-base error.
    try:
        from requests.auth import AuthBase as _RequestsAuthBase
    except ImportError:  # pragma: no cover - exercised in a subprocess test

        class _RequestsAuthBase:
            pass

    try:
        from httpx import Auth as _HttpxAuthBase
    except ImportError:  # pragma: no cover - exercised in a subprocess test

        class _HttpxAuthBase:
            pass


__version__ = "0.1.0"
__all__ = ["EdrvAuth", "EdrvAuthError", "TokenRequestError"]

_log = logging.getLogger("edrv_auth")

_DEFAULT_TOKEN_URL: Final = "https://auth.edrv.io/oauth/token"
_DEFAULT_AUDIENCE: Final = "https://api.edrv.io"
_DEFAULT_API_URL: Final = "https://api.edrv.io"

_ENV_CLIENT_ID: Final = "EDRV_CLIENT_ID"
_ENV_CLIENT_SECRET: Final = "EDRV_CLIENT_SECRET"
_ENV_API_KEY: Final = "EDRV_API_KEY"
_ENV_TOKEN_URL: Final = "EDRV_TOKEN_URL"
_ENV_AUDIENCE: Final = "EDRV_AUDIENCE"
_ENV_API_URL: Final = "EDRV_API_URL"
_ENV_CACHE_DIR: Final = "EDRV_AUTH_CACHE_DIR"
_ENV_REDIS_URL: Final = "EDRV_AUTH_REDIS_URL"

#: Longest wait for the token cache lock, in seconds.
_LOCK_TIMEOUT = 30.0
#: A token request, retries and backoff included, gives up before this many
#: seconds so that a waiting process never times out on a healthy holder.
_FETCH_DEADLINE: Final = 25.0
#: Attempts for one token request (the first one plus retries).
_MAX_ATTEMPTS: Final = 3
_BACKOFF_BASE: Final = 0.5
_BACKOFF_CAP: Final = 5.0
#: A `Retry-After` longer than this is not waited for: the request fails now.
_RETRY_AFTER_CAP: Final = 10.0
#: Storm cap: token requests per window, per credential
#: set, counted in the shared cache across every process.
_MAX_TOKEN_REQUESTS: Final = 5
_TOKEN_REQUEST_WINDOW: Final = 60.0
#: A lifetime under this is taken as this long: a bogus `expires_in` (a
#: millisecond) must not make every API call a token request. Longer lifetimes
#: are honoured exactly; a token that really dies sooner is caught by the 401
#: retry, whose requests the cap counts.
_MIN_LIFETIME: Final = 1.0
#: After a failed renewal the current token stays in use until it expires, and
#: renewal is tried again this long after (or at expiry, if that comes first):
#: an outage costs one token request per process per interval, not one per call.
_RENEW_RETRY: Final = 30.0
#: Used when the token endpoint omits `expires_in`; the 401 retry covers a guess
#: that turns out too long.
_DEFAULT_EXPIRES_IN: Final = 3600.0
#: Request times this far in our future still count: machines sharing Redis
#: disagree a little about the time.
_CLOCK_SKEW: Final = 30.0
#: Longer lifetimes are clamped, so a bogus `expires_in` cannot pin a token.
_MAX_EXPIRES_IN: Final = 30 * 86400.0
#: Cap on bodies read from the token endpoint and from the cache file.
_MAX_BODY: Final = 64 * 1024
#: OAuth errors that mean "these credentials or this audience are wrong".
_CREDENTIAL_ERRORS: Final = frozenset(
    {None, "access_denied", "invalid_client", "unauthorized_client", "invalid_grant"}
)
#: How often a waiter looks again while waiting for a lock.
_LOCK_POLL: Final = 0.05
#: Rounds of PBKDF2 that name a credential set's cache entry (see `_credential_digest`).
_NAME_ROUNDS: Final = 10_000
#: A background renewal waits for the locks at least this long, whatever its timeout.
_RENEWAL_LOCK_WAIT: Final = 5.0
#: Redis: socket timeouts, how long to leave an unreachable Redis alone, and how
#: long a dead holder's lock lasts (longer than a token request may take).
_REDIS_TIMEOUT: Final = 2.0
_REDIS_RETRY_AFTER: Final = 30.0
_REDIS_LOCK_TTL = _FETCH_DEADLINE + 2.0
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]{1,16384}")
#: OAuth `error` values other than the standard ones are shown only in this shape.
_ERROR_CODE: Final = re.compile(r"[a-z][a-z_]{0,63}")


class _Clock(NamedTuple):
    """The module's one clock: wall time (token lifetimes, the shared records),
    monotonic time (deadlines, lock waits) and sleeping (backoff).

    Tests replace `_clock` with one they move forward, so that expiry needs no
    sleeping.
    """

    time: Callable[[], float]
    monotonic: Callable[[], float]
    sleep: Callable[[float], None]


_clock = _Clock(time.time, time.monotonic, time.sleep)


# ---- Errors -----------------------------------------------------------------


class EdrvAuthError(Exception):
    """Base class of every error that ``edrv_auth`` raises on purpose.

    Messages never contain a client secret, an API key or an access token.
    """


class TokenRequestError(EdrvAuthError):
    """The token endpoint could not give a token.

    Attributes:
        status_code: The HTTP status of the last answer, or ``None`` when there
            was none (connection error, timeout, or a request not sent because
            of the token-request rate cap).
        error: The OAuth ``error`` code from the answer's JSON body, if any.
    """

    def __init__(
        self, message: str, status_code: int | None = None, error: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error


# ---- Token values: secrets, tokens, cache records, small helpers ------------


def _env(name: str) -> str | None:
    """An environment variable, with empty meaning unset."""
    return os.environ.get(name) or None


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, with the default port filled in."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("not an http(s) URL")
    return scheme, host, parts.port or _DEFAULT_PORTS[scheme]


def _clean(text: str, secrets: _Redactor | None = None, limit: int = 200) -> str:
    """Make server-provided text safe for a message: no secrets, no control chars.

    Control characters go first, so that replacing them cannot rebuild a
    secret. Text that still echoes the secret in any encoding (see `_Redactor`)
    is shown as ``***`` only.
    """
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if secrets is not None:
        text = secrets.mask(text)
        if secrets.echoes(text):
            return "***"
    return text[:limit] + ("..." if len(text) > limit else "")


class _Secret:
    """A client secret, API key or token that never shows itself.

    Error reporters (Sentry, Rollbar, ``traceback`` with ``capture_locals``)
    collect the local variables of every frame of a raised error and walk
    strings, bytes, tuples, lists and dicts field by field; anything else they
    show by its ``repr``. Secrets therefore travel inside this object and are
    unwrapped (``.value``) only inside the expression that builds a header or
    the token request's form, never into a local variable.
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __reduce__(self) -> tuple[type[_Secret], tuple[str]]:
        return _Secret, (self.value,)


def _fold(text: str) -> str:
    """``text`` for comparison: compatibility forms unified, case folded, and every
    invisible, combining, control or space character removed."""
    import unicodedata

    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "CMZ")


class _Redactor:
    """Recognises the client secret in server-provided text, however it was encoded.

    A proxy or endpoint may echo the form (the secret URL-encoded, with ``/``
    kept or not, upper- or lower-case escapes), the Basic header (base64 of the
    secret or of ``client_id:secret``), or an HTML page (entities), with
    invisible characters slipped in. Text that shares any run of 8 characters
    (the whole secret, if shorter) with any of these is not shown; exact copies
    are masked first, so that a description naming the secret in passing still
    reads well. The encodings are built inside the methods, never kept.
    """

    __slots__ = ("_client_id", "_secret")

    def __init__(self, client_id: str | None, secret: _Secret | None) -> None:
        self._client_id = client_id or ""
        self._secret = secret

    def __repr__(self) -> str:
        return "_Redactor('***')"

    def _encodings(self) -> list[str]:
        import base64

        if not self._secret:
            return []
        quote = urllib.parse.quote
        variants = [
            self._secret.value,
            quote(self._secret.value, safe=""),
            quote(self._secret.value),
            urllib.parse.quote_plus(self._secret.value),
            urllib.parse.quote_plus(self._secret.value, safe="/"),
        ]
        for plain in (self._secret.value, f"{self._client_id}:{self._secret.value}"):
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                variants.append(encode(plain.encode()).decode())
                variants.append(variants[-1].rstrip("="))
        variants += [v.lower() for v in variants[1:5]]  # lower-case percent escapes
        return sorted({v for v in variants if v}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        """``text`` with exact copies of any encoding of the secret replaced by ``***``."""
        for encoding in self._encodings():
            text = text.replace(encoding, "***")
        return text

    def echoes(self, text: str) -> bool:
        """Whether ``text``, decoded every way a server might have encoded it, shares a
        run of 8 characters with any encoding of the secret."""
        import html

        views = {_fold(text)}
        for decode in (urllib.parse.unquote, urllib.parse.unquote_plus, html.unescape):
            decoded = text
            for _ in range(3):  # double encodings too
                decoded = decode(decoded)
                views.add(_fold(decoded))
        for encoding in self._encodings():
            folded = _fold(encoding)
            width = min(8, len(folded))
            runs = {folded[i : i + width] for i in range(len(folded) - width + 1)}
            if any(run and run in view for run in runs for view in views):
                return True
        return False

    def clean(self, text: str, limit: int = 200) -> str | None:
        """``text`` made safe for a message, or ``None`` if it echoes the secret."""
        shown = _clean(text, self, limit)
        return None if shown == "***" and text.strip() != "***" else shown


def _is_number(value: object) -> TypeGuard[float]:
    """A finite int or float (not a bool): what JSON numbers must be to be used."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float, e.g. 10**400 in a JSON file
        return False


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """Parse a JSON object from untrusted bytes; ``None`` for anything else.

    Deeply nested input raises RecursionError rather than ValueError.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class _Token(NamedTuple):
    """An access token and when it was obtained and expires (epoch seconds).

    Error reporters walk tuples field by field: the token is a `_Secret`, shown as ``***``.
    """

    access_token: _Secret
    obtained_at: float
    expires_at: float
    scope: str = ""

    def refresh_at(self, margin: float) -> float:
        """When to start replacing this token: ``margin`` seconds before it expires.

        A lifetime no longer than the margin would make every token stale at
        birth, so the margin shrinks to half the lifetime in that case.
        """
        lifetime = self.expires_at - self.obtained_at
        if lifetime < margin or math.isclose(lifetime, margin):  # equal: stale at birth too
            margin = lifetime / 2
        return self.expires_at - margin

    def to_json(self) -> dict[str, object]:
        return {
            "access_token": self.access_token.value,
            "obtained_at": self.obtained_at,
            "expires_at": self.expires_at,
            "scope": self.scope,
        }

    @classmethod
    def from_json(cls, data: object) -> _Token | None:
        if not isinstance(data, dict):
            return None
        obtained, expires, scope = (
            data.get("obtained_at"),
            data.get("expires_at"),
            data.get("scope", ""),
        )
        if (
            not isinstance(data.get("access_token"), str)
            or not _TOKEN_CHARS.fullmatch(data["access_token"])
            or not _is_number(obtained)
            or not _is_number(expires)
            or obtained < 0
            or obtained > expires
            # What the token endpoint could not have given (its lifetime is
            # clamped), or a time from a future beyond clock skew: planted.
            or expires - obtained > _MAX_EXPIRES_IN + 1
            or obtained > _clock.time() + _CLOCK_SKEW
            or not isinstance(scope, str)
        ):
            return None
        # The scope is printed by `status`: no control characters from a planted record.
        return cls(
            _Secret(data["access_token"]),
            float(obtained),
            float(expires),
            _clean(scope, limit=1000),
        )


class _Published:
    """A token as the hot path sends it: the token, its header, and until when to send it.

    ``serve_until`` is usually the token's refresh time; after a failed renewal
    or past the storm cap it is later (never past the expiry), and it is
    infinite for an API key.
    """

    __slots__ = ("header", "serve_until", "token")

    def __init__(self, token: _Token, serve_until: float) -> None:
        self.token = token
        self.serve_until = serve_until
        self.header = f"Bearer {token.access_token.value}"

    @property
    def access_token(self) -> _Secret:
        return self.token.access_token

    def __repr__(self) -> str:
        return f"_Published(serve_until={self.serve_until!r})"


class _SharedFailure(NamedTuple):
    """A token request that failed, kept in the shared record for whoever waited for it.

    Processes and threads that were waiting for the lock while it failed get
    this error instead of repeating the request one after another. Only safe
    text is kept: the message an error of this module carries.
    """

    at: float
    message: str
    status_code: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, exc: TokenRequestError, at: float) -> _SharedFailure:
        return cls(at, str(exc), exc.status_code, exc.error)

    def to_raise(self) -> TokenRequestError:
        return TokenRequestError(self.message, self.status_code, self.error)

    def to_json(self) -> dict[str, object]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: object) -> _SharedFailure | None:
        """The failure a record holds, or ``None`` if it is not one we could have written."""
        if not isinstance(data, dict):
            return None
        at, message = data.get("at"), data.get("message")
        status, error = data.get("status_code"), data.get("error")
        if (
            not _is_number(at)
            or at > _clock.time() + _CLOCK_SKEW
            or not isinstance(message, str)
            or not (status is None or (isinstance(status, int) and 100 <= status <= 599))
            or not (error is None or (isinstance(error, str) and _ERROR_CODE.fullmatch(error)))
        ):
            return None
        # `status` prints nothing of it, but a message is raised: no control characters.
        return cls(float(at), _clean(message, limit=1000), status, error)


class _CacheRecord(NamedTuple):
    """What the shared cache holds: the token, what the rate cap counts, the last failure.

    The storm cap counts, in ``requests``, every token request
    except a renewal: the successful replacement of a token that reached its
    refresh time. Renewals need no cap, since single-flight allows one per token
    lifetime, and capping them would break short-lived tokens. Only the latest
    renewal is kept (``renewed_at``) and counted, so that an uncured 401 sees a
    hard limit of 5 token requests a minute, the renewal before it included.
    """

    token: _Token | None = None
    requests: tuple[float, ...] = ()
    renewed_at: float | None = None
    #: A renewal of ``token`` failed: keep using it, and try again at this time.
    renew_after: float | None = None
    #: The last token request failed, and no token was left to use.
    failure: _SharedFailure | None = None

    def counted_times(self, now: float) -> tuple[float, ...]:
        """The counted token-request times within the cap's window ending at ``now``."""
        times = (*self.requests, *(() if self.renewed_at is None else (self.renewed_at,)))
        earliest, latest = now - _TOKEN_REQUEST_WINDOW, now + _CLOCK_SKEW
        return tuple(sorted(t for t in times if earliest < t <= latest))

    def after_request(
        self,
        token: _Token | None,
        rejected: _Secret | None,
        sent: Sequence[float],
        now: float,
        renew_after: float | None = None,
        failure: _SharedFailure | None = None,
        forced: bool = False,
    ) -> _CacheRecord:
        """The record at ``now``, after a token request whose attempts reached eDRV at ``sent``.

        A token the API rejected, or one that has expired, is dropped even if
        no new one came; ``renew_after`` is kept only with the token that a
        renewal failed to replace, and ``failure`` only when no token is left.
        A ``forced`` request (the doctor's ``--fetch``) is never a renewal: it
        replaces a token whatever its age, so each one counts towards the cap.
        """
        window = now - _TOKEN_REQUEST_WINDOW
        requests = [t for t in self.requests if t > window]
        renewed_at, counted = self.renewed_at, list(sent)
        renewal = not forced and rejected is None and self.token is not None
        if token is not None and renewal and counted:
            renewed_at = counted.pop()  # a renewal: the old token reached its refresh time
        requests.extend(counted)
        old = self.token
        kept = old if old and old.access_token != rejected and now < old.expires_at else None
        renew_after = renew_after if token is None and kept is not None else None
        return _CacheRecord(
            token or kept,
            tuple(requests[-_MAX_TOKEN_REQUESTS:]),
            renewed_at,
            renew_after,
            failure if token is None and kept is None else None,
        )

    def without_token(self) -> _CacheRecord:
        return _CacheRecord(None, self.requests, self.renewed_at)


def _dump_record(state: _CacheRecord) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "token": state.token.to_json() if state.token else None,
            "token_requests": list(state.requests),
            "renewed_at": state.renewed_at,
            "renew_after": state.renew_after,
            "failure": state.failure.to_json() if state.failure else None,
        }
    ).encode()


def _parse_record(raw: bytes) -> _CacheRecord | None:
    """The record in ``raw``, or ``None`` unless every part of it is one we could have written.

    A record with one untrustworthy part (a token that is not one, a failure
    from the future) is ignored whole, request times included: whoever
    planted it may have chosen those too.
    """
    data = _json_object(raw)
    if data is None or data.get("version") != 1:
        return None
    requests = data.get("token_requests")
    if not isinstance(requests, list) or not all(_is_number(t) for t in requests):
        return None
    renewed_at = data.get("renewed_at")
    if renewed_at is not None and not _is_number(renewed_at):
        return None
    token_data, failure_data = data.get("token"), data.get("failure")
    token = _Token.from_json(token_data)
    failure = _SharedFailure.from_json(failure_data)
    if (token is None and token_data is not None) or (failure is None and failure_data is not None):
        return None
    requests = tuple(float(t) for t in requests[-_MAX_TOKEN_REQUESTS:])
    # Absent (older writers), or not a retry time we would have set: ignored.
    renew_after: float | None = None
    if _is_number(data.get("renew_after")):
        renew_after = float(data["renew_after"])
        limit = _clock.time() + _RENEW_RETRY + _CLOCK_SKEW
        renew_after = renew_after if renew_after <= limit else None
    return _CacheRecord(
        token, requests, None if renewed_at is None else float(renewed_at), renew_after, failure
    )


# ---- Token endpoint: the token request, its transport and parsing -----------


#: CA variables, in the order requests (first pair) and httpx (second pair) read them.
_CA_VARIABLES: Final = (("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"), ("SSL_CERT_FILE", "SSL_CERT_DIR"))
_TRUST_HINT: Final = (
    "if a company proxy or a private CA signs it, set REQUESTS_CA_BUNDLE or SSL_CERT_FILE "
    "to that CA's bundle, or pass verify= a CA bundle path or an ssl.SSLContext"
)
#: OpenSSL's verify codes for a certificate issued for another host or IP address, and
#: for one past its end date.
_NAME_MISMATCH: Final = frozenset({62, 64})
_EXPIRED: Final = 10
#: RFC 6749 and RFC 6750 error codes, and a few common extensions: always shown.
_OAUTH_ERRORS: Final = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "unsupported_response_type",
        "server_error",
        "temporarily_unavailable",
        "invalid_token",
        "insufficient_scope",
        "too_many_requests",
    }
)


#: Built SSL contexts, one per trust configuration and process (a context is
#: costly to build: certifi's bundle alone holds about 150 certificates).
_contexts: dict[tuple[object, ...], ssl.SSLContext] = {}

#: httpx clients for the token request, one per process, trust and proxy
#: configuration; a few at most, the oldest dropped (none holds a connection).
_clients: dict[tuple[object, ...], httpx.Client] = {}
_MAX_CLIENTS: Final = 8

#: httpx gives each address of a host, and the TLS handshake, its whole connect
#: timeout. This share of `timeout` lets two addresses that do not answer (IPv6
#: ones on a network where IPv6 is broken) still leave time for the next one.
_CONNECT_SHARE: Final = 1 / 3


class _Answer:
    """An HTTP answer from the token endpoint.

    Its body may hold a token, or echo the form with the client secret in it,
    so it lives in this object, whose ``repr`` shows the status only, and never
    in a ``bytes`` local of a frame that may raise.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: httpx.Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"_Answer(status={self.status})"


class _Failure(NamedTuple):
    """A failed attempt: the error to raise, and what it means for retries and the cap.

    ``reached``: the request may have reached the endpoint, so it counts towards
    the rate cap. ``retry``: another attempt may succeed.
    """

    error: TokenRequestError
    reached: bool
    retry: bool
    retry_after: float | None = None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first (httpx wraps
    httpcore's, which wrap the ``OSError`` or ``ssl`` error that says what happened)."""
    for _ in range(16):  # a bound, in case a library ever builds a cycle
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def _network_error_text(exc: BaseException) -> str:
    """A short, safe description of a network error: its root cause, never its arguments."""
    import httpx

    root = list(_chain(exc))[-1]
    if isinstance(exc, httpx.TimeoutException) or isinstance(root, TimeoutError):
        return "timed out"
    if isinstance(root, socket.gaierror):
        return f"unknown host ({_clean(str(root.strerror or 'name lookup failed'))})"
    reason = getattr(root, "reason", None)  # ssl.SSLError: OpenSSL's reason code
    text = getattr(root, "strerror", None) or (reason if isinstance(reason, str) else None)
    name = type(root).__name__
    return _clean(f"{name}: {text}" if text else name, limit=120)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loosened(context: ssl.SSLContext) -> bool:
    """Whether an SSL context no longer checks certificates and host names."""
    import ssl

    return context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname


def _locations(name: str, path: str) -> tuple[str | None, str | None]:
    """``path`` as (CA file, hashed CA folder); ``SSL_CERT_DIR`` always names a folder."""
    folder = name == "SSL_CERT_DIR" or os.path.isdir(path)
    return (None, path) if folder else (path, None)


def _trust(verify: bool | str | ssl.SSLContext) -> tuple[ssl.SSLContext, str] | str:
    """The SSL context for the token request and what it trusts; or why there is none.

    ``verify=True`` trusts what requests and httpx trust here: the bundle of
    ``REQUESTS_CA_BUNDLE`` (else ``CURL_CA_BUNDLE``), as requests reads them,
    with that of ``SSL_CERT_FILE`` (else ``SSL_CERT_DIR``), as httpx reads
    them; else certifi's bundle; else the system's store. A variable naming
    nothing that exists is skipped, with one warning: often a leftover that
    only the other library reads. A path or a context given as ``verify`` is
    used as given (a context loosened since construction is refused). A
    context is built once per process and configuration.
    """
    import ssl

    if isinstance(verify, ssl.SSLContext):
        if _loosened(verify):
            return (
                "verify= is an ssl.SSLContext that no longer checks certificates and host "
                "names: refused, the token request carries the client secret"
            )
        return verify, "the ssl.SSLContext given as verify="
    sources: list[tuple[str, str]] = []
    missing: list[tuple[str, str]] = []
    if isinstance(verify, str):
        sources.append(("verify=", verify))
    else:
        for group in _CA_VARIABLES:
            named = next(((name, os.environ[name]) for name in group if _env(name)), None)
            if named is not None:
                (sources if os.path.exists(named[1]) else missing).append(named)
    if not sources:
        with contextlib.suppress(ImportError):
            import certifi

            sources.append(("certifi", certifi.where()))
    label = (
        ", ".join(
            f"{name} {path}" if name in ("verify=", "certifi") else f"{name}={path}"
            for name, path in sources
        )
        or "the system's CA store"
    )
    key = (os.getpid(), tuple(sources), tuple(missing))
    context = _contexts.get(key)
    if context is None:
        for name, path in missing:
            _log.warning("%s names %s, which does not exist: not trusted", name, path)
        try:
            # Only the named sources when there are any (the system store is not
            # added), as requests and httpx do.
            (cafile, capath), *others = [_locations(*source) for source in sources] or [
                (None, None)
            ]
            context = ssl.create_default_context(cafile=cafile, capath=capath)
            for cafile, capath in others:
                context.load_verify_locations(cafile, capath)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            return f"cannot load the CA certificates of {label}: {_clean(str(reason))}"
        _log.debug("the token request trusts %s", label)
        _contexts[key] = context
    return context, label


def _client(context: ssl.SSLContext | None) -> httpx.Client | str:
    """The httpx client for the token request, built once per configuration; or why none works.

    ``context`` is ``None`` for a plain ``http://`` token URL (loopback only),
    which never goes through a proxy: the proxy would read the client secret.
    Otherwise the client takes the proxies the environment names, as httpx
    reads them. A proxy URL httpx cannot use is described, never shown: it may
    hold a password.
    """
    import urllib.request

    import httpx

    # The proxy URLs may hold a password: never in a plain local, which error reporters collect.
    proxies = _Secret(repr(sorted(urllib.request.getproxies().items())) if context else "")
    key = (os.getpid(), id(context), proxies)
    client = _clients.get(key)
    if client is not None:
        return client
    try:
        client = httpx.Client(
            verify=context or True, trust_env=context is not None, follow_redirects=False
        )
    except (ImportError, ValueError, httpx.InvalidURL):  # ImportError: socks5:// without socksio
        return (
            "the proxy named by HTTPS_PROXY, HTTP_PROXY or ALL_PROXY cannot be used: httpx takes "
            "http:// and https:// proxies, and socks5:// ones once its SOCKS support is "
            "installed (pip install 'httpx[socks]')"
        )
    while len(_clients) >= _MAX_CLIENTS:
        _clients.pop(next(iter(_clients)), None)
    _clients[key] = client
    return client


#: What each step that httpx's ``trace`` extension reports starts, once the way to
#: the endpoint is open (until then, through a proxy, every step is "tunnel").
_STAGES: Final = {
    "connect_tcp": "connect",  # the name lookup too
    "start_tls": "tls",
    "send_request_headers": "send",
    "send_request_body": "sent",  # the form is being written: the attempt counts
    "receive_response_headers": "answer",
}


class _Exchange:
    """One attempt of the token request on httpx, under a hard deadline.

    httpx bounds each read and write, not the whole exchange: an endpoint that
    drips one header byte a second keeps it going for ever. So the request runs
    in a daemon thread that the caller waits for until the deadline. httpx's
    ``trace`` extension reports each network stream it opens and the stage
    reached; at the deadline the streams' sockets are shut down, which ends the
    worker's read or write at once. A name lookup cannot be interrupted: its
    worker is left to finish alone, and a stream it opens afterwards is closed
    as soon as it is reported, before anything is sent on it. Nor can a TLS
    handshake under way (``ssl`` holds its socket until it ends): httpx's
    connect timeout, a third of ``timeout``, ends that worker soon after.

    ``doctor`` sends its checks the same way, without a form: ``peer`` and
    ``setting`` then name what it checks (the API, say) in the messages.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        trusted: str,
        peer: str = "the token endpoint",
        setting: str = _ENV_TOKEN_URL,
    ) -> None:
        import httpx

        target = httpx.URL(url)
        self.url, self.timeout, self.trusted = url, timeout, trusted
        self.peer, self.setting = peer, setting
        self.request = "the token request" if setting == _ENV_TOKEN_URL else "the request"
        self.host = target.raw_host.decode("ascii")
        self.authority = _authority(self.host, target.port or _DEFAULT_PORTS[target.scheme])
        self.stage = "connect"
        self.proxy: tuple[str, int] | None = None  # when httpx connected to one
        self.tunnelled = False
        self.refusal: int | None = None  # the proxy's status for CONNECT, if not 2xx
        self.done = threading.Event()
        self.outcome: _Answer | _Failure | None = None
        self._streams: list[Any] = []
        self._abandoned = False
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's ``trace`` extension: note each stage as it starts, and each stream."""
        *_, step, phase = event.split(".")
        opening = self.proxy is not None and not self.tunnelled  # the way through a proxy
        if phase == "started" and step == "connect_tcp":
            peer = (str(info["host"]), int(info["port"]))
            self.proxy = peer if _authority(*peer) != self.authority else None
        elif phase == "started":
            self.stage = "tunnel" if opening else _STAGES.get(step, self.stage)
        elif phase == "complete" and step in ("connect_tcp", "start_tls"):
            with self._lock:
                abandoned = self._abandoned
                if not abandoned:
                    self._streams.append(info["return_value"])
            if abandoned:  # the deadline passed while it was opened (a name lookup, say)
                info["return_value"].close()  # this is the worker's thread: close, and stop
                raise TimeoutError("this attempt's deadline has passed")
        elif phase == "complete" and step == "setup_socks5_connection":
            self.tunnelled = True
        elif phase == "complete" and step == "receive_response_headers" and opening:
            status = int(info["return_value"][1])  # the proxy's answer to CONNECT
            self.tunnelled = 200 <= status < 300
            self.refusal = None if self.tunnelled else status

    def send(
        self, client: httpx.Client, form: _Secret | None, auth: httpx.Auth | None = None
    ) -> _Answer | _Failure:
        """Run the attempt in its worker thread; its outcome by the deadline."""
        name = "edrv_auth-token-request" if form else "edrv_auth-check"
        worker = threading.Thread(
            target=self.run, args=(client, form, auth), name=name, daemon=True
        )
        try:
            worker.start()
        except RuntimeError:  # at exit, Python 3.12 starts no thread: httpx's timeouts must do
            self.run(client, form, auth)
        return self.result()

    def run(self, client: httpx.Client, form: _Secret | None, auth: httpx.Auth | None) -> None:
        """The worker: POST the form (without one, GET the URL, ``auth`` adding its header) and
        read the answer; keep the outcome unless abandoned."""
        import httpx

        outcome: _Answer | _Failure
        headers = {
            "Accept": "application/json",
            "User-Agent": f"edrv-auth/{__version__}",
            "Connection": "close",  # each attempt its own connection, and its socket
        }
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            with client.stream(
                "POST" if form else "GET",
                self.url,
                content=form.value.encode() if form else None,
                headers=headers,
                auth=auth,
                timeout=httpx.Timeout(self.timeout, connect=self.timeout * _CONNECT_SHARE),
                extensions={"trace": self.trace},
            ) as response:
                # The body decoded, cut at `_MAX_BODY` bytes (the deadline bounds the read).
                body = next(response.iter_bytes(_MAX_BODY), b"")[:_MAX_BODY]
                outcome = _Answer(response.status_code, response.headers, body)
        except Exception as exc:  # noqa: BLE001 - any failure is this attempt's, told by `failure`
            outcome = self.failure(exc)
        with self._lock:
            if not self._abandoned:
                self.outcome = outcome
        self.done.set()

    def result(self) -> _Answer | _Failure:
        """Wait for the worker until the deadline, ``timeout`` seconds away; then end it."""
        try:
            self.done.wait(self.timeout)
        finally:  # on Ctrl-C too: an attempt given up on must not go on in its thread
            with self._lock:
                self._abandoned = True
                outcome, streams = self.outcome, list(self._streams)
            for stream in streams if outcome is None else ():
                _shut_down(stream)
        return outcome or self.failure(None)

    def failure(self, exc: BaseException | None) -> _Failure:
        """What ended the attempt: ``exc`` raised in the worker, or the deadline (``None``).

        Only an attempt that got to write its form counts towards the rate cap.
        A certificate or a proxy's refusal is final, anything else retried.
        """
        import ssl

        import httpx

        proxy = f"the proxy {_authority(*self.proxy)}" if self.proxy else ""
        certificate = next(
            (e for e in _chain(exc) if isinstance(e, ssl.SSLCertVerificationError)), None
        )
        if certificate is not None:
            message = self.certificate_error(proxy if self.stage == "tunnel" else "", certificate)
        elif self.refusal is not None:
            message = self.refused(proxy, self.refusal)
        elif self.stage == "answer" and (exc is None or isinstance(exc, httpx.TimeoutException)):
            message = (
                f"{self.peer} {self.url} did not answer in time "
                f"(timed out after {self.timeout:g} s)"
            )
        elif self.stage == "answer":
            message = (
                f"{self.peer} {self.url} closed the connection or sent a malformed or "
                f"incomplete answer ({type(exc).__name__})"
            )
        else:
            why = "timed out" if exc is None else _network_error_text(exc)
            message = {
                "connect": f"could not reach {proxy or f'{self.peer} {self.url}'}: {why} "
                f"(check the network, any proxy settings, and {self.setting})",
                "tunnel": f"{proxy} failed to open a tunnel to {self.authority}: {why}",
                "tls": f"the TLS handshake with {self.peer} {self.url} failed: {why}",
            }.get(self.stage, f"{self.request} to {self.url} failed: {why}")
        final = certificate is not None or (self.refusal is not None and self.refusal < 500)
        reached = self.stage in ("sent", "answer")  # the form may have been written
        return _Failure(TokenRequestError(message), reached=reached, retry=not final)

    def certificate_error(self, proxy: str, exc: ssl.SSLCertVerificationError) -> str:
        """Why a certificate failed verification, whose it was (the endpoint's, or an
        ``https://`` ``proxy``'s), and how to fix it."""
        reason = _clean(str(exc.verify_message or exc.reason or "certificate verify failed"))
        who = proxy or f"{self.peer} {self.url}"
        if exc.verify_code in _NAME_MISMATCH:
            setting = "HTTPS_PROXY or ALL_PROXY" if proxy else self.setting
            host = self.proxy[0] if self.proxy and proxy else self.host
            return (
                f"the certificate of {who} is not valid for {host} "
                f"(hostname mismatch: {reason}); check {setting}"
            )
        if exc.verify_code == _EXPIRED:
            return (
                f"the certificate of {who} has expired ({reason}): unless this machine's clock "
                "is wrong, its owner must renew it"
            )
        # httpx checks an https:// proxy against certifi and the system's store, not ours.
        trusted = "certifi's bundle and the system's store" if proxy else self.trusted
        return (
            f"the certificate of {who} is not trusted ({reason}; trusted here: {trusted}): "
            f"{_TRUST_HINT}"
        )

    def refused(self, proxy: str, status: int) -> str:
        """A proxy's error answer to ``CONNECT``: its 5xx (it could not reach the endpoint,
        which may pass) named as its own, its 4xx (its policy or credentials) with the fix."""
        import httpx

        answer = f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
        if status >= 500:
            return (
                f"{proxy} could not open a tunnel to {self.authority}: {answer} "
                "(the proxy's answer, not the token endpoint's)"
            )
        fix = (
            "check the user name and password in HTTPS_PROXY or ALL_PROXY"
            if status == 407
            else f"add {self.host} to NO_PROXY if it must be reached directly"
        )
        return f"{proxy} refused the tunnel to {self.authority}: {answer} ({fix})"


def _shut_down(stream: Any) -> None:
    """End every read and write on one of httpx's network streams at once."""
    sock = stream.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed, or wrapped by TLS since
            sock.shutdown(socket.SHUT_RDWR)


def _post(
    url: str, form: _Secret, timeout: float, verify: bool | str | ssl.SSLContext
) -> _Answer | _Failure:
    """POST ``form`` to ``url`` with httpx; return the answer (body capped), or why there is none.

    httpx does HTTP, TLS and proxies; `_Exchange` ends the whole attempt (name
    lookup, connect, tunnel, TLS handshake, request, answer) by one deadline
    ``timeout`` seconds away, however slowly the bytes come. Never raises for a
    network failure: httpx's exceptions, whose frames hold the form, stay in
    the worker thread and become a `_Failure`, chained to nothing when raised.
    """
    trusted = ""
    context: ssl.SSLContext | None = None
    if urllib.parse.urlsplit(url).scheme.lower() == "https":
        trust = _trust(verify)
        if isinstance(trust, str):
            return _Failure(TokenRequestError(trust), reached=False, retry=False)
        context, trusted = trust
    client = _client(context)
    if isinstance(client, str):
        return _Failure(TokenRequestError(client), reached=False, retry=False)
    return _Exchange(url, timeout, trusted).send(client, form)


def _content_type(headers: httpx.Headers) -> str:
    """The media type of an answer, as ``email`` reads it (``text/plain`` when absent or odd)."""
    value = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return _clean(value if value.count("/") == 1 else "text/plain", limit=64)


def _parse_token(answer: _Answer, obtained_at: float, redactor: _Redactor) -> _Token | str:
    """Turn a 2xx token answer into a `_Token`, or say what is wrong with it.

    Returns rather than raises: the parsed document may hold the token or an
    echoed secret, and must not sit in a frame of a raised error.
    """
    data = _json_object(answer.body)
    if data is None:
        return (
            f"the token endpoint answered {_content_type(answer.headers)}, not a JSON token "
            "(a proxy or gateway may have answered instead of eDRV)"
        )
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not _TOKEN_CHARS.fullmatch(access_token):
        return "the token endpoint's answer has no usable access_token"
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _clean(token_type, redactor, limit=32) if isinstance(token_type, str) else "?"
        return f"the token endpoint issued a {shown!r} token, not Bearer"
    expires_in = data.get("expires_in", _DEFAULT_EXPIRES_IN)
    if not _is_number(expires_in) or expires_in <= 0:
        return "the token endpoint's answer has an invalid expires_in (not a positive number)"
    scope = data.get("scope")
    scope = _clean(scope, redactor, limit=1000) if isinstance(scope, str) else ""
    lifetime = min(max(float(expires_in), _MIN_LIFETIME), _MAX_EXPIRES_IN)
    token = _Token(_Secret(access_token), obtained_at, obtained_at + lifetime, scope)
    _log.debug("obtained a token valid for %.0f s (scope %r)", lifetime, token.scope)
    return token


def _token_error(url: str, answer: _Answer, redactor: _Redactor) -> TokenRequestError:
    """Describe a failed token response from its status and OAuth fields only.

    Never the raw body: a proxy may echo the form, client secret included. The
    OAuth ``error`` is shown only when it is a plain error code, and
    ``error_description`` only when no part of it echoes the secret.
    """
    status = answer.status
    error = description = None
    withheld = False
    data = _json_object(answer.body)
    if data is not None:
        raw_error, raw_description = data.get("error"), data.get("error_description")
        if isinstance(raw_error, str) and (
            raw_error in _OAUTH_ERRORS
            or (_ERROR_CODE.fullmatch(raw_error) and not redactor.echoes(raw_error))
        ):
            error = raw_error
        if isinstance(raw_description, str):
            description = redactor.clean(raw_description)
            withheld = description is None
            if description is not None and redactor.echoes(
                (error or "") + redactor.mask(raw_description)
            ):
                description, withheld = None, True  # the secret split between the two
                if error not in _OAUTH_ERRORS:
                    error = None
    message = f"token request to {url} failed: HTTP {status}"
    if error:
        message += f" {error}"
    if description:
        message += f": {description}"
    if withheld:
        message += " (error_description withheld: it echoed the client secret)"
    if data is None and answer.body:
        message += (
            f" (answered {_content_type(answer.headers)}, not JSON: a proxy or gateway, not eDRV?)"
        )
    if status in (400, 401, 403) and error in _CREDENTIAL_ERRORS:
        message += f" (check {_ENV_CLIENT_ID}, {_ENV_CLIENT_SECRET} and the audience)"
    if status == 404:  # a wrong path or host in the URL, not a refusal
        message += f" (no token endpoint at that URL: check {_ENV_TOKEN_URL} or token_url=)"
    return TokenRequestError(message, status, error)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or HTTP date).

    Any all-digit value is seconds, however long (a long one is then not waited
    for at all); the result is capped to stay a finite float.
    """
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):  # str.isdigit() also accepts "²"
        return min(float(value), 1e9)
    import email.utils

    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        moment = email.utils.parsedate_to_datetime(value)
        return max(float(moment.timestamp()) - _clock.time(), 0.0)
    return None


def _backoff(attempt: int, retry_after: float | None) -> float:
    """Delay before attempt ``attempt + 1``: Retry-After, else capped jittered exponential."""
    if retry_after is not None:
        return min(retry_after, _RETRY_AFTER_CAP)
    exponential = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** min(attempt - 1, 16))
    return exponential * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto


def _after_attempts(
    error: TokenRequestError, attempts: int, seconds: float, timeout: float
) -> TokenRequestError:
    """``error``, the last attempt's, saying how hard the request tried when it retried.

    ``timeout`` bounds each attempt, not the whole request: the message says both.
    """
    if attempts < 2:
        return error
    return TokenRequestError(
        f"{error} ({attempts} attempts over {seconds:.1f} s, each limited to {timeout:g} s)",
        error.status_code,
        error.error,
    )


def _token_or_failure(
    url: str, answer: _Answer, redactor: _Redactor, obtained_at: float
) -> _Token | _Failure:
    """The token in a 2xx answer, or the failure any other answer means."""
    status = answer.status
    if 200 <= status < 300:
        parsed = _parse_token(answer, obtained_at, redactor)
        if isinstance(parsed, str):
            return _Failure(TokenRequestError(parsed, status), reached=True, retry=False)
        return parsed
    error = _token_error(url, answer, redactor)
    if status != 429 and status < 500:
        return _Failure(error, reached=True, retry=False)
    retry_after = _retry_after(answer.headers.get("Retry-After"))
    if retry_after is not None and retry_after > _RETRY_AFTER_CAP:
        return _Failure(error, reached=True, retry=False)
    return _Failure(error, reached=True, retry=True, retry_after=retry_after)


class _TokenEndpoint:
    """eDRV's token endpoint for one set of client credentials: the token request.

    Holds what the request needs (the secret masked) and nothing else; the
    token source calls ``request`` under its locks and within its rate cap.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: _Secret,
        audience: str,
        timeout: float,
        verify: bool | str | ssl.SSLContext,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.timeout = timeout
        self.verify = verify

    def __repr__(self) -> str:
        return f"_TokenEndpoint({self.url!r}, client_id={self.client_id!r})"

    def __getstate__(self) -> dict[str, object]:
        if not isinstance(self.verify, (bool, str)):
            # An SSLContext does not pickle; say so here rather than with a
            # TypeError from deep inside multiprocessing.
            raise EdrvAuthError(
                "this EdrvAuth cannot be pickled: verify= is an ssl.SSLContext, which cannot "
                "cross processes; pass verify= the path of a CA bundle instead, or create "
                "the EdrvAuth in each process"
            )
        return self.__dict__.copy()

    def form(self) -> _Secret:
        """The client-credentials form, masked: the secret is unwrapped only in this expression."""
        return _Secret(
            urllib.parse.urlencode(
                {
                    "grant_type": "client_credentials",
                    "client_id": self.client_id,
                    "client_secret": self.client_secret.value,
                    "audience": self.audience,
                }
            )
        )

    def request(self, attempts: int) -> tuple[_Token | TokenRequestError, list[float]]:
        """Ask the token endpoint for a token, retrying transient failures.

        Connection errors, timeouts, 429 and 5xx are retried with exponential
        backoff and jitter (a `Retry-After` is honoured up to a cap); other 4xx,
        an untrusted certificate and a proxy refusing the tunnel are final. Each
        attempt ends by ``timeout``, and all of them within `_FETCH_DEADLINE`.

        Returns the token, or the error to raise; and the time of every
        attempt that reached the endpoint, which the shared rate cap counts.
        The caller raises: nothing here holds the secret, the answer or a token
        in a plain local, and error reporters collect the locals of each frame
        of an error and of its chained ones.
        """
        redactor = _Redactor(self.client_id, self.client_secret)
        started = _clock.monotonic()
        sent: list[float] = []
        attempt = 0
        while True:
            attempt += 1
            _log.debug("requesting a token from %s (attempt %d)", self.url, attempt)
            obtained_at = _clock.time()
            answer = _post(self.url, self.form(), self.timeout, self.verify)
            if isinstance(answer, _Answer):
                sent.append(obtained_at)
                outcome = _token_or_failure(self.url, answer, redactor, obtained_at)
                if isinstance(outcome, _Token):
                    return outcome, sent
            else:
                outcome = answer
                if outcome.reached:
                    sent.append(obtained_at)
            delay = _backoff(attempt, outcome.retry_after)
            if (
                not outcome.retry
                or attempt >= attempts
                or _clock.monotonic() - started + delay + self.timeout > _FETCH_DEADLINE
            ):
                return _after_attempts(
                    outcome.error, attempt, _clock.monotonic() - started, self.timeout
                ), sent
            _log.debug(
                "token request failed (%s); retrying in %.2f s", outcome.error.status_code, delay
            )
            _clock.sleep(delay)


# ---- Shared caches: one small interface, a file and Redis -------------------


if TYPE_CHECKING:  # a typing aid only: no Protocol class to build at import

    class _Store(Protocol):
        """Where processes share the state: the token core talks only to this.

        ``read`` returns the trusted state or ``None``; ``write`` replaces it, but
        only while it still holds the token ``replacing`` (compare-and-swap, in one
        step where the lock alone cannot guarantee it); ``locked`` is the
        cross-process lock for one token request, raising ``EdrvAuthError`` on
        timeout. Any method raises ``OSError`` when the store cannot be used.
        """

        label: str

        def read(self) -> _CacheRecord | None: ...

        def write(self, state: _CacheRecord, replacing: _Secret | None) -> None: ...

        def remove(self) -> None: ...

        def locked(self, deadline: float) -> contextlib.AbstractContextManager[None]: ...


_O_NOFOLLOW: Final[int] = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: Final[int] = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK: Final[int] = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY: Final[int] = getattr(os, "O_DIRECTORY", 0)


class _Unusable(OSError):
    """A shared cache (the folder, or Redis) cannot be used; the message says why, naming no
    secret (for Redis, its error class only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


#: Cache names already derived in this process, by a quick HMAC of the same parts.
_credential_names: dict[str, str] = {}


def _credential_digest(token_url: str, audience: str, client_id: str, secret: _Secret) -> str:
    """The name of one credential set's cache entry: token URL, audience, client id, secret.

    A wrong or rotated secret has its own entry (and its own rate cap) and
    never receives the token cached for another. The name shows in file
    names, Redis keys and messages, so it is derived slowly (PBKDF2, keyed by
    the secret): someone who sees it cannot test guesses at the secret
    quickly, as a plain hash would let them. That costs about 2 ms, once per
    process and credential set.
    """
    message = f"{token_url}\n{audience}\n{client_id}".encode()
    quick = hmac.new(secret.value.encode(), message, hashlib.sha256).hexdigest()
    name = _credential_names.get(quick)
    if name is None:
        slow = hashlib.pbkdf2_hmac("sha256", secret.value.encode(), message, _NAME_ROUNDS)
        name = _credential_names[quick] = slow.hex()[:32]
    return name


def _untrusted(info: os.stat_result) -> str | None:
    """Why a cache file must not be trusted, or ``None`` if it may be."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return "owned by another user"
    if os.name == "posix" and info.st_mode & 0o022:
        return "writable by group or others"
    if info.st_size > _MAX_BODY:
        return "too large"
    return None


def _default_cache_dir() -> Path:
    """The per-user cache folder, without a dependency (appdirs' rules).

    ========  ===========================================
    Windows   ``%LOCALAPPDATA%\\edrv_auth``
    macOS     ``~/Library/Caches/edrv_auth``
    other     ``$XDG_CACHE_HOME/edrv_auth`` (if absolute), else ``~/.cache/edrv_auth``
    ========  ===========================================
    """
    if sys.platform == "win32":  # pragma: no cover - CI runs on Linux
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":  # pragma: no cover - CI runs on Linux
        base = str(Path.home() / "Library" / "Caches")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".cache")
    return Path(base) / "edrv_auth"


class _FileCache:
    """The token cache file shared by every process of one user.

    One file per credential set (token URL, audience, client id and secret),
    named by `_credential_digest` so that no part of it shows in the file
    name, inside a ``0700`` folder. Writes go to a
    temporary ``0600`` file that atomically replaces the old one. Reads trust
    only a regular file owned by this user and not writable by others, opened
    without following symbolic links; anything else is ignored and replaced.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.label = str(directory)
        self.path = directory / f"{name}.json"
        self.lock_path = directory / f"{name}.lock"
        self._lock: filelock.BaseFileLock | None = None
        self._lock_pid = 0

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_lock": None}  # a FileLock does not pickle

    def make_lock(self) -> filelock.BaseFileLock:
        import filelock

        return filelock.FileLock(self.lock_path, mode=0o600)

    @contextlib.contextmanager
    def locked(self, deadline: float) -> Iterator[None]:
        """Hold the lock file beside the cache; a holder that dies releases it."""
        try:
            import filelock
        except RuntimeError:  # first needed in an exit handler: Python 3.10 and 3.11 refuse
            raise OSError(0, "filelock cannot be loaded while the process exits") from None

        if self._lock is None or self._lock_pid != os.getpid():
            # filelock refuses a lock object inherited across fork(): one per process.
            self._lock, self._lock_pid = self.make_lock(), os.getpid()
        self.ensure_dir()
        waits = max(deadline - _clock.monotonic(), 0)
        try:
            self._lock.acquire(timeout=waits)
        except filelock.Timeout as exc:  # a TimeoutError, hence an OSError: convert first
            raise EdrvAuthError(
                f"timed out after {waits:.0f} s waiting for the token cache lock "
                f"{self.lock_path} (another process holds it)"
            ) from exc
        try:
            yield
        finally:
            self._lock.release()

    def ensure_dir(self) -> None:
        """Create the folder ``0700``, or make an existing one of ours private.

        A restrictive umask (``0o277``, say) would create it without write
        permission for its owner; a permissive one is harmless to ``mkdir``
        but a folder may have been made group-writable since. Either way it is
        set to ``0700``.

        Raises ``OSError`` for a folder that is not ours to use: another user's,
        or anything but a real folder in its place (a symbolic link included).
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.check_dir():
            return
        # Through a descriptor opened without following links, so that the
        # folder made private is the one just checked, not one swapped in since.
        fd = os.open(self.directory, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            if os.fstat(fd).st_uid != os.getuid():  # pragma: no cover - a race lost
                raise _Unusable("the folder is owned by another user")
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    def check_dir(self) -> bool:
        """Whether the folder (if any) needs making private; ``OSError`` if it is not ours.

        ``lstat``, not ``stat``: a symbolic link in the folder's place would lead
        our files and lock wherever its owner chose.
        """
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            raise _Unusable("not a folder" if not stat.S_ISLNK(info.st_mode) else "a symlink")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise _Unusable("the folder is owned by another user")
        # Permission bits mean nothing on Windows.
        return os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o722 != 0o700

    def read(self) -> _CacheRecord | None:
        """Return the cached state, or ``None`` if there is none to trust.

        Raises ``OSError`` when the folder is not ours (see `check_dir`).
        """
        self.check_dir()
        fd = -1
        try:
            # O_NONBLOCK: opening (or reading) a FIFO planted here must not wait for a writer.
            fd = os.open(self.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
            problem = _untrusted(os.fstat(fd))
            raw = b"" if problem else os.read(fd, _MAX_BODY + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        finally:
            if fd >= 0:
                os.close(fd)
        if problem:
            _log.debug("ignoring the cache file %s: %s", self.path, problem)
            return None
        state = _parse_record(raw)
        if state is None:
            _log.debug("ignoring the cache file %s: not a valid token cache", self.path)
        return state

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write(self, state: _CacheRecord, replacing: _Secret | None = None) -> None:
        """Atomically replace the cache file with ``state``.

        The lock file, which only a live process can hold, already makes the
        read-compare-write under it atomic, so ``replacing`` needs no check.
        """
        self.ensure_dir()
        temporary = self.directory / f".{self.path.name}.{os.getpid()}.{random.getrandbits(32):08x}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            try:
                if hasattr(os, "fchmod"):  # Windows has no fchmod
                    os.fchmod(fd, 0o600)  # a umask can only remove bits; make it exact
                os.write(fd, _dump_record(state))  # no local: the state holds the token
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete temporary files that a writer killed mid-write left behind.

        Only ours (by name), only regular files, and only old ones: a fresh one
        may belong to a writer that is still at work.
        """
        for leftover in self.directory.glob(f".{self.path.name}.*"):
            with contextlib.suppress(OSError):
                info = leftover.lstat()
                if stat.S_ISREG(info.st_mode) and _clock.time() - info.st_mtime > 60:
                    leftover.unlink()


#: Replace the state only if it still holds the token we read (ARGV[1], "" for
#: none), whatever happened to the lock meanwhile (it may have expired).
_REDIS_SWAP: Final = """
local current = redis.call('GET', KEYS[1])
local held = ''
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and type(doc['token']) == 'table'
     and type(doc['token']['access_token']) == 'string' then
    held = doc['token']['access_token']
  end
end
if held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


#: Read the state unless it is larger than ARGV[1] bytes: then only its size.
_REDIS_READ: Final = """
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return size end
return redis.call('GET', KEYS[1])
"""


#: Give a lock that never expires (PTTL -1) the TTL ARGV[1] that ours have.
_REDIS_EXPIRE_FOREVER: Final = """
if redis.call('PTTL', KEYS[1]) == -1 then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""


#: Release the lock only if we still own it.
_REDIS_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _redis_label(url: _Secret) -> tuple[str, str]:
    """(what is wrong with a Redis URL or "", a label for it without user or password)."""
    parts = urllib.parse.urlsplit(url.value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "redis_url must be a redis://, rediss:// or unix:// URL", ""
    if parts.scheme == "unix":
        return "", f"unix://{parts.path}"
    if not parts.hostname:
        return "redis_url has no host", ""
    try:
        port = parts.port or 6379
    except ValueError:
        return "redis_url has an invalid port", ""
    return "", f"{parts.scheme}://{parts.hostname}:{port}{parts.path}"


class _RedisCache:
    """The shared state in Redis, for processes on many machines.

    The state is stored under a key named by `_credential_digest`, with a
    TTL that ends when it stops being useful, and holds no secret but the
    token. Single flight across machines is a ``SET NX PX`` lock with a
    random owner value, released only by its owner and expiring by itself if
    the holder dies; the write after a token request is a compare-and-swap
    in a Lua script. Any Redis error makes the store unusable for a while
    (``OSError``), so the core falls back to the file.
    """

    def __init__(self, url: _Secret, name: str) -> None:
        try:
            # An optional dependency: the ignore lets `mypy --strict` pass on a copy of
            # this file where redis is not installed (and is unused where it is).
            import redis  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:  # fail at construction, not at the first request
            raise EdrvAuthError("redis_url needs the redis package: pip install redis") from None
        # The URL may hold a password: it is parsed in a frame that returns
        # before anything raises, and comes back as a label that shows none.
        problem, label = _redis_label(url)
        if problem:
            raise EdrvAuthError(problem)
        self.label = label
        self.key = f"edrv_auth:{name}"
        self.lock_key = f"{self.key}:lock"
        self._url = url
        self._client: Any = None
        self._client_pid = 0
        self._down_until = 0.0

    def __repr__(self) -> str:
        return f"_RedisCache({self.label!r})"  # the URL may hold a password

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_client": None}

    def _call(self, operation: Callable[[Any], Any]) -> Any:
        """Run one Redis operation; any Redis failure becomes an OSError."""
        import redis  # type: ignore[import-not-found, unused-ignore]  # as in __init__

        if _clock.monotonic() < self._down_until:
            raise _Unusable("unreachable a moment ago")
        try:
            if self._client is None or self._client_pid != os.getpid():
                self._client = redis.Redis.from_url(
                    self._url.value,  # unwrapped only here, where redis-py takes it
                    socket_connect_timeout=_REDIS_TIMEOUT,
                    socket_timeout=_REDIS_TIMEOUT,
                )
                self._client_pid = os.getpid()
            return operation(self._client)
        except (redis.RedisError, ValueError) as exc:  # ValueError: a URL redis-py rejects
            self._down_until = _clock.monotonic() + _REDIS_RETRY_AFTER
            raise _Unusable(type(exc).__name__) from exc

    def read(self) -> _CacheRecord | None:
        """The state in Redis, checked as the cache file is (and as large at most)."""
        raw = self._call(lambda r: r.eval(_REDIS_READ, 1, self.key, _MAX_BODY))
        if raw is None:
            return None
        if isinstance(raw, int):
            _log.debug("ignoring the Redis cache %s: too large (%d bytes)", self.label, raw)
            return None
        state = _parse_record(raw)
        if state is None:
            _log.debug("ignoring the Redis cache %s: not a valid token cache", self.label)
        return state

    def write(self, state: _CacheRecord, replacing: _Secret | None) -> None:
        now = _clock.time()
        useful_until = max(state.counted_times(now), default=now) + _TOKEN_REQUEST_WINDOW
        if state.token is not None:
            useful_until = max(useful_until, state.token.expires_at)
        ttl_ms = max(int((useful_until - now) * 1000), 1000)
        swapped = self._call(
            lambda r: r.eval(
                _REDIS_SWAP,
                1,
                self.key,
                replacing.value if replacing else "",
                _dump_record(state),
                ttl_ms,
            )
        )
        if not swapped:
            _log.debug("the Redis cache changed meanwhile; not overwriting it")

    def remove(self) -> None:
        self._call(lambda r: r.delete(self.key))

    @contextlib.contextmanager
    def locked(self, deadline: float) -> Iterator[None]:
        owner = os.urandom(16).hex()
        ttl_ms = int(_REDIS_LOCK_TTL * 1000)
        checked = False
        while not self._call(lambda r: r.set(self.lock_key, owner, nx=True, px=ttl_ms)):
            if not checked:
                # A lock without a TTL was not set by this protocol; give it one,
                # so that it ends like a dead holder's instead of never.
                self._call(lambda r: r.eval(_REDIS_EXPIRE_FOREVER, 1, self.lock_key, ttl_ms))
                checked = True
            if _clock.monotonic() >= deadline:
                # A lock that never expires (a holder that set no TTL) must not
                # stop the fleet: leave Redis alone for a while, use the file.
                _log.debug("timed out waiting for the token lock in Redis %s", self.label)
                self._down_until = _clock.monotonic() + _REDIS_RETRY_AFTER
                raise _Unusable("its token lock was held too long")
            time.sleep(_LOCK_POLL)  # waiting for another process: real time
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                self._call(lambda r: r.eval(_REDIS_RELEASE, 1, self.lock_key, owner))


def _forget_token(store: _Store, deadline: float) -> None:
    """Drop the token from one store, keeping the rate cap's record if recent."""
    if store.read() is None:
        return  # nothing to forget: create no folder, lock or key
    with store.locked(deadline):
        state = store.read()
        if state is None:
            return
        forgotten = state.without_token()
        if not forgotten.counted_times(_clock.time()):
            store.remove()
        else:
            store.write(forgotten, state.token.access_token if state.token else None)


# ---- Token source: memory -> shared cache -> endpoint, single-flight -------


def _cap_error(counted: tuple[float, ...], now: float) -> TokenRequestError:
    """The storm cap's refusal: why, and when the next token request is allowed."""
    wait = max(counted[0] + _TOKEN_REQUEST_WINDOW - now, 0.0)
    return TokenRequestError(
        f"not requesting a token: {len(counted)} token requests for this client id and "
        f"secret in the last {_TOKEN_REQUEST_WINDOW:.0f} s already (eDRV treats excessive "
        f"token requests as misuse); the cap counts per credential set (client id and "
        f"secret), across every process using this cache, and clearing the cache does not "
        f"lift it: the next request is allowed in {wait:.0f} s"
    )


class _InFlightFetch:
    """One token fetch in a worker thread that the tasks of one event loop await."""

    def __init__(
        self, done: anyio.Event | asyncio.Event, handoff: anyio.Lock | asyncio.Lock
    ) -> None:
        self.done = done
        self.handoff = handoff
        self.value: _Published | None = None
        self.error: Exception | None = None


class _ProcessState:
    """What belongs to one process: its locks, fetches and renewal, and what it saw.

    Locks do not survive pickling, and one held by another thread at fork time
    would never be released in the child; keeping them here lets pickling drop
    them and a forked child replace them in one step, a renewal in flight
    included. (The caches keep their own per-process lock and connection the
    same way.)
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.fetches: dict[tuple[int, _Secret | None], _InFlightFetch] = {}
        #: The last failed token request this process made (its waiting threads get it).
        self.last_failure: _SharedFailure | None = None
        self.record = _CacheRecord()  # the last record seen; all there is without a cache
        self.warned: set[str] = set()  # caches already reported unusable
        self.renewal_failing = False  # a failed renewal was logged at WARNING


class _Renewal:
    """One background renewal: when its lock waits and the whole of it must end."""

    __slots__ = ("done", "ends_by", "locks_by")

    def __init__(self, lock_wait: float, timeout: float) -> None:
        now = _clock.monotonic()
        self.locks_by = now + lock_wait
        self.ends_by = self.locks_by + timeout
        self.done = threading.Event()


class _Renewals:
    """This process's background renewals: one per shared cache at a time, waited for at exit.

    Keyed by the cache file, so that every `EdrvAuth` of one credential set
    (an application may make one per request) shares one renewal. Threads are
    started with `_thread`, which does not wait for the new thread to run: an
    event loop starting one is not held up. A forked child starts empty.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty: in a forked child, none of the parent's threads run."""
        self.lock = threading.Lock()  # held for a dictionary lookup at most
        self.latest: dict[str, _Renewal] = {}
        self.exiting = False

    def start(
        self, key: str, renew: Callable[[_Renewal], None], lock_wait: float, timeout: float
    ) -> None:
        """Run ``renew`` in a daemon thread, with a `_Renewal` of these deadlines, unless a
        renewal for ``key`` runs already or the process is exiting (its exit handlers run).

        Every call during a renewal lands here: it looks, and builds nothing.
        """
        if not self.lock.acquire(blocking=False):
            return  # another thread is starting one, or looking
        try:
            running = self.latest.get(key)
            if self.exiting or (running is not None and not running.done.is_set()):
                return
            renewal = _Renewal(lock_wait, timeout)
            with contextlib.suppress(RuntimeError):  # "can't create new thread at shutdown"
                _thread.start_new_thread(renew, (renewal,))
                self.latest[key] = renewal
        finally:
            self.lock.release()

    def finish(self) -> None:
        """At exit, let each renewal end, within its deadline.

        A short-lived process (the command line, a cron script) would otherwise
        lose a renewal it started when the interpreter kills its thread, and
        the next run, finding the token still due, would request another. None
        starts after this ran.
        """
        with self.lock:
            self.exiting = True
            running = list(self.latest.values())
        for renewal in running:
            renewal.done.wait(max(renewal.ends_by - _clock.monotonic(), 0.0))


_renewals = _Renewals()
atexit.register(_renewals.finish)
if hasattr(os, "register_at_fork"):  # fork() exists on POSIX only
    os.register_at_fork(after_in_child=_renewals.reset)


def _async_backend() -> tuple[Callable[..., Any], Callable[[], Any], Callable[[], Any]]:
    """Worker-thread runner, event and lock factories for the running async library.

    anyio (always installed with httpx) serves asyncio and trio alike; plain
    asyncio is the fallback when the file is vendored without it.
    """
    try:
        import anyio
        import anyio.to_thread
    except ImportError:  # pragma: no cover - exercised in a subprocess test
        import asyncio

        return asyncio.to_thread, asyncio.Event, asyncio.Lock
    return anyio.to_thread.run_sync, anyio.Event, anyio.Lock


class _TokenSource:
    """Where every token comes from: memory, then the shared cache, then eDRV.

    The one place that decides about tokens, for every adapter: it publishes
    the token the hot path serves, reads and writes the shared caches (Redis,
    then the file, then memory), makes at most one token request at a time per
    credential set across threads, processes and machines, and enforces the
    storm cap. It knows nothing about HTTP clients.

    A token past its refresh time that will outlive a token request (it has
    more than ``timeout`` seconds left) is still sent while a daemon thread
    renews it: nobody waits for that renewal, in this process or another.
    A token closer to its expiry, an expired one and a rejected one are
    replaced before anything is sent.

    Thread-safe; safe across fork (the per-process state is replaced in the
    child); pickles without its per-process state and published token.
    """

    renews = True

    def __init__(
        self,
        endpoint: _TokenEndpoint,
        file_cache: _FileCache,
        redis_cache: _RedisCache | None,
        refresh_margin: float,
    ) -> None:
        self.endpoint = endpoint
        self.file_cache = file_cache
        #: Where records are shared, in the order they are tried.
        self.stores: tuple[_Store, ...] = (
            (file_cache,) if redis_cache is None else (redis_cache, file_cache)
        )
        self.refresh_margin = refresh_margin
        #: The token the hot path serves, until its ``serve_until``; replaced by
        #: one assignment, so readers need no lock.
        self.published: _Published | None = None
        self._process = _ProcessState()

    def __getstate__(self) -> dict[str, object]:
        # The child reads the shared cache instead; locks do not pickle.
        return {**self.__dict__, "published": None, "_process": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._process = _ProcessState()

    def process_state(self) -> _ProcessState:
        process = self._process
        if process.pid != os.getpid():
            # A forked child: a lock that another thread held at fork time would
            # never be released here, so start from fresh state.
            process = self._process = _ProcessState()
        return process

    def current(self) -> _Published | None:
        """The published token if it is before its ``serve_until``: the hot path.

        One attribute read, one clock read and one comparison; no lock, no file.
        """
        published = self.published
        if published is not None and _clock.time() < published.serve_until:
            return published
        return None

    def token(self, rejected: _Secret | None) -> _Published:
        """A token to send other than ``rejected``, the API's refusal of which was just seen.

        The published token if it may be sent, or is due but will outlive its
        renewal (which then starts in the background); otherwise whatever
        `_obtain` blocks for.
        """
        published = self.published
        servable = self._servable(published, rejected) or self._while_renewing(published, rejected)
        return servable or self._obtain(rejected)

    async def atoken(self, rejected: _Secret | None) -> _Published:
        """`token`, without blocking the event loop: the same core, in a worker thread.

        Tasks of one event loop that need a token at the same time share one
        fetch (keyed by the loop's thread and the rejected token), so a hundred
        tasks on a cold cache occupy one worker thread and cause one token
        request. The event loop itself never waits for a lock: it reads one
        attribute, and at most starts a background renewal.
        """
        published = self.published
        servable = self._servable(published, rejected)
        if servable is None and "filelock" in sys.modules:  # a renewal imports nothing here
            servable = self._while_renewing(published, rejected)
        if servable is not None:
            return servable
        run_sync, make_event, make_lock = _async_backend()
        fetches = self.process_state().fetches
        key = (threading.get_ident(), rejected)
        fetch = fetches.get(key)
        if fetch is not None:
            await fetch.done.wait()
            async with fetch.handoff:
                pass  # resume the waiters one per loop turn, not all in one long turn
            if fetch.error is not None:
                raise fetch.error
            if fetch.value is not None:
                return fetch.value
            return await self.atoken(rejected)  # the leading task was cancelled
        fetch = fetches[key] = _InFlightFetch(make_event(), make_lock())
        try:
            fetch.value = await run_sync(self.token, rejected)
        except Exception as exc:
            fetch.error = exc
            raise
        finally:
            del fetches[key]
            fetch.done.set()
        return fetch.value

    def clear(self) -> list[str]:
        """Forget the token in memory and in every shared cache, keeping the cap's record.

        Returns the caches it could not change, each with the reason.
        """
        process = self.process_state()
        deadline = _clock.monotonic() + _LOCK_TIMEOUT
        failed: list[str] = []
        with self._thread_lock(process, deadline):  # after any token request in flight
            self.published = None
            process.record = process.record.without_token()
            for store in self.stores:
                try:
                    _forget_token(store, deadline)
                except OSError as exc:
                    self._warn_unusable(process, store, exc)
                    failed.append(f"{store.label} ({exc.strerror or type(exc).__name__})")
        return failed

    def read_shared(
        self, process: _ProcessState, problems: list[str] | None = None
    ) -> tuple[_Store | None, _CacheRecord | None]:
        """The first store that holds a record, and the record; ``(None, None)`` if none does.

        An empty Redis (flushed, restarted) does not hide the record mirrored to
        the file: a machine reuses its saved token instead of requesting one.
        """
        for store in self.stores:
            record = self._read(process, store, problems)
            if record is not None:
                return store, record
        return None, None

    # -- the blocking path -------------------------------------------------

    def _obtain(self, rejected: _Secret | None, renewal: _Renewal | None = None) -> _Published:
        """Block for a token other than ``rejected``: from the shared cache, else eDRV.

        A token request is made only under the cross-process lock and only
        while the shared rate cap allows it. ``rejected`` is replaced only if
        the cache still holds it (compare-and-swap): a token that another
        thread or process already put in its place is returned instead. A
        caller that waited for a lock while the token request of the thread or
        process holding it failed gets that failure, without a request of its
        own. ``renewal``: this is a background renewal, whose lock waits end in
        time for its one attempt.
        """
        process = self.process_state()
        # Failures seen now, to tell those that happen while this call waits:
        # compared by identity, not by clocks, which may differ between machines.
        failed_here = process.last_failure
        deadline = renewal.locks_by if renewal else _clock.monotonic() + _LOCK_TIMEOUT

        def meanwhile() -> _Published | None:
            published = self.published
            return self._servable(published, rejected) or (
                None if renewal else self._while_renewing(published, rejected)
            )

        with self._thread_lock(process, deadline, meanwhile) as servable:
            servable = servable or self._servable(self.published, rejected)
            if servable is not None:
                return servable
            if process.last_failure is not failed_here and process.last_failure is not None:
                _log.debug("the token request made while this one waited failed")
                raise process.last_failure.to_raise()
            # Every write replaces the record whole, so a read without the lock
            # is safe: a new process with a warm cache never touches the lock.
            shared = self.read_shared(process)[1]
            record = shared or process.record
            servable = self._publish_fresh(record, rejected)
            if servable is None and renewal is None and rejected is None:
                due = self._as_published(record)
                if due is not None and self._outlives_a_renewal(due.token):
                    self.published = due  # first: a renewal that fails falls back on it
                    servable = self._while_renewing(due, rejected)
            if servable is not None:
                _log.debug(
                    "using the token in the shared cache (%.0f s left)",
                    servable.token.expires_at - _clock.time(),
                )
                return servable
            failed_elsewhere = shared.failure if shared else None
            with self._lock_first_usable_store(process, deadline) as store:
                # What the locked store itself holds is what a write may replace:
                # an empty Redis is filled, whatever token the file mirrors.
                own = None if store is None else self._read(process, store)
                record = own or process.record
                servable = self._publish_fresh(record, rejected)
                if servable is not None:
                    return servable
                if own is not None and own.failure not in (None, failed_elsewhere):
                    _log.debug("the token request another process made meanwhile failed")
                    raise own.failure.to_raise()
                replacing = own.token if own else None
                return self._request_within_cap(process, record, rejected, store, replacing)

    def request_now(self) -> _Published:
        """Make one token request now, whatever is cached (the doctor's ``--fetch``).

        It is counted, and refused past the cap. A failure raises, but leaves a
        cached token that has not expired in use, as it was.
        """
        process = self.process_state()
        deadline = _clock.monotonic() + _LOCK_TIMEOUT
        with (
            self._thread_lock(process, deadline),
            self._lock_first_usable_store(process, deadline) as store,
        ):
            own = None if store is None else self._read(process, store)
            record = own or process.record
            replacing = own.token if own else None
            return self._request_within_cap(process, record, None, store, replacing, forced=True)

    def _request_within_cap(
        self,
        process: _ProcessState,
        record: _CacheRecord,
        rejected: _Secret | None,
        store: _Store | None,
        replacing: _Token | None,
        forced: bool = False,
    ) -> _Published:
        """Request a new token within the shared rate cap; record the outcome and save it.

        ``forced``: `request_now`, which raises past the cap and on failure.
        """
        now = _clock.time()
        counted = record.counted_times(now)
        if len(counted) >= _MAX_TOKEN_REQUESTS:
            if forced:
                raise _cap_error(counted, now)
            return self._serve_past_the_cap(record, counted, now, rejected)
        if rejected is not None:
            _log.debug("the API rejected the current token; requesting a new one")
        # A renewal while the token still works: one attempt, no backoff; the
        # token covers the outage and renewal is simply tried again later.
        held = (
            record.token
            if rejected is None and record.token and now < record.token.expires_at
            else None
        )
        attempts = _MAX_ATTEMPTS if forced or not held else 1
        result, sent = self.endpoint.request(min(_MAX_TOKEN_REQUESTS - len(counted), attempts))
        ended = _clock.time()
        kept = failure = None
        if isinstance(result, TokenRequestError):
            if held is None or ended >= held.expires_at:
                failure = process.last_failure = _SharedFailure.of(result, ended)
            elif not forced:  # held stays in the record either way
                kept = self._keep_after_failed_renewal(process, held, result)
        token = result if isinstance(result, _Token) else None
        renew_after = kept.serve_until if kept else None
        process.record = record.after_request(
            token, rejected, sent, ended, renew_after, failure, forced
        )
        if store is not None:
            self._save(process, store, process.record, replacing)
        if isinstance(result, TokenRequestError):
            if kept is None:
                raise result
            return kept
        process.renewal_failing = False
        published = _Published(result, result.refresh_at(self.refresh_margin))
        if _clock.time() < published.serve_until:  # even one stale at birth is sent once
            self.published = published
        return published

    def _keep_after_failed_renewal(
        self, process: _ProcessState, held: _Token, exc: Exception
    ) -> _Published:
        """Keep sending a token that has not expired; try renewing it again later.

        The retry time goes into the shared record too (``renew_after``), so
        that other processes wait as well. Logged at WARNING once per outage,
        at DEBUG after that.
        """
        now = _clock.time()
        kept = _Published(held, min(now + _RENEW_RETRY, held.expires_at))
        self.published = kept
        level = logging.DEBUG if process.renewal_failing else logging.WARNING
        process.renewal_failing = True
        _log.log(
            level,
            "could not renew the token (%s); still using the current one, which expires in "
            "%.0f s; trying again in %.0f s",
            exc if isinstance(exc, EdrvAuthError) else type(exc).__name__,
            held.expires_at - now,
            kept.serve_until - now,
        )
        return kept

    def _serve_past_the_cap(
        self,
        record: _CacheRecord,
        counted: tuple[float, ...],
        now: float,
        rejected: _Secret | None,
    ) -> _Published:
        """Past the storm cap: a token that has not expired yet, else an error saying when.

        A rejected token is handed back (it tells a retrying caller not to
        resend); a token that is only due is served until the cap allows its
        renewal.
        """
        allowed_at = counted[0] + _TOKEN_REQUEST_WINDOW
        for token in (record.token, self.published.token if self.published else None):
            if token is not None and now < token.expires_at:
                _log.debug("token request rate cap reached; keeping the current token")
                if token.access_token == rejected:
                    return _Published(token, token.refresh_at(self.refresh_margin))
                kept = self.published = _Published(token, min(allowed_at, token.expires_at))
                return kept
        raise _cap_error(counted, now)

    # -- the background renewal ----------------------------------------------

    def _outlives_a_renewal(self, token: _Token) -> bool:
        """Whether ``token`` stays valid for longer than one token request may take."""
        return _clock.time() < token.expires_at - self.endpoint.timeout

    def _while_renewing(
        self, published: _Published | None, rejected: _Secret | None
    ) -> _Published | None:
        """``published`` if it outlives a renewal, which is then under way in the background.

        Never assigns ``published``: the caller read it, and it may have been
        replaced (by a renewal) or cleared since.
        """
        if (
            published is None
            or rejected is not None
            or not self._outlives_a_renewal(published.token)
        ):
            return None
        self._renew_in_background()
        return published

    def _renew_in_background(self) -> None:
        """Make sure a renewal of this cache's token runs in the background.

        Its lock waits end in time for its one attempt (``timeout``) to end
        within `_FETCH_DEADLINE`, though never sooner than `_RENEWAL_LOCK_WAIT`.
        Once the process has begun to exit, none starts: its thread would be
        killed (or, on some Pythons, could not start, nor import filelock), and
        the token, which outlives a renewal, is renewed by the next run.
        """
        try:
            import filelock  # noqa: F401 - now, as the renewal could not import it at exit
        except RuntimeError:  # "can't register atexit after shutdown"
            return
        lock_wait = max(_FETCH_DEADLINE - self.endpoint.timeout, _RENEWAL_LOCK_WAIT)
        _renewals.start(str(self.file_cache.path), self._renew, lock_wait, self.endpoint.timeout)

    def _renew(self, renewal: _Renewal) -> None:
        """The background renewal thread: the blocking path, with nobody waiting for it.

        Whatever goes wrong, the current token is kept until it expires and
        renewal is tried again later, as after a failed token request.
        """
        try:
            self._obtain(None, renewal)
        except Exception as exc:  # noqa: BLE001 - nobody to raise it to
            published = self.published
            now = _clock.time()
            if published is not None and published.serve_until <= now < published.token.expires_at:
                self._keep_after_failed_renewal(self.process_state(), published.token, exc)
        finally:
            renewal.done.set()

    # -- decisions ---------------------------------------------------------

    def _servable(
        self, published: _Published | None, rejected: _Secret | None
    ) -> _Published | None:
        """``published`` if it may be sent: before its ``serve_until``, and not rejected."""
        if (
            published is None
            or published.access_token == rejected
            or _clock.time() >= published.serve_until
        ):
            return None
        return published

    def _as_published(self, record: _CacheRecord) -> _Published | None:
        """The record's token with the time until which it may be sent without renewal.

        Usually its refresh time; after a failed renewal (``renew_after``) it
        is served until the next try, for every process, never past expiry.
        """
        token = record.token
        if token is None:
            return None
        serve_until = token.refresh_at(self.refresh_margin)
        if record.renew_after is not None:
            serve_until = max(serve_until, min(record.renew_after, token.expires_at))
        return _Published(token, serve_until)

    def _publish_fresh(self, record: _CacheRecord, rejected: _Secret | None) -> _Published | None:
        """Publish the record's token for the hot path if it may be sent, and return it."""
        servable = self._servable(self._as_published(record), rejected)
        if servable is not None:
            self.published = servable  # one assignment: readers need no lock
        return servable

    # -- the shared caches ---------------------------------------------------

    def _save(
        self, process: _ProcessState, store: _Store, record: _CacheRecord, replacing: _Token | None
    ) -> None:
        """Write ``record`` to the locked store, and copy it to the stores after it.

        The copy (say, Redis's record into the file) is what a fallback starts
        from if the first store goes away: the rate cap's record included.
        """
        held = replacing.access_token if replacing else None
        for target in self.stores[self.stores.index(store) :]:
            try:
                target.write(record, held if target is store else None)
            except OSError as exc:
                self._warn_unusable(process, target, exc)

    def _read(
        self, process: _ProcessState, store: _Store, problems: list[str] | None = None
    ) -> _CacheRecord | None:
        """The record one store holds (remembered in memory), or ``None``."""
        try:
            record = store.read()
        except OSError as exc:
            self._warn_unusable(process, store, exc)
            if problems is not None:
                problems.append(f"{store.label} unusable ({exc.strerror or type(exc).__name__})")
            return None
        if record is not None:
            process.record = record
        return record

    @contextlib.contextmanager
    def _thread_lock(
        self,
        process: _ProcessState,
        deadline: float,
        meanwhile: Callable[[], _Published | None] = lambda: None,
    ) -> Iterator[_Published | None]:
        """Hold this process's lock around token decisions, yielding ``None``.

        While waiting for it, ``meanwhile`` is asked every `_LOCK_POLL` seconds
        for a token to send instead: the lock's holder may be a background
        renewal that nobody needs to wait for. Then that token is yielded,
        without the lock.
        """
        while not process.lock.acquire(
            timeout=min(_LOCK_POLL, max(deadline - _clock.monotonic(), 0))
        ):
            found = meanwhile()
            if found is not None:
                yield found
                return
            if _clock.monotonic() >= deadline:
                raise EdrvAuthError("timed out waiting for another thread's token request")
        try:
            yield None
        finally:
            process.lock.release()

    @contextlib.contextmanager
    def _lock_first_usable_store(
        self, process: _ProcessState, deadline: float
    ) -> Iterator[_Store | None]:
        """Lock the first usable shared store and yield it; ``None`` means memory only.

        A store that cannot be used (Redis unreachable, a read-only cache folder
        in a container) is skipped with one warning, never failing the request.
        """
        for store in self.stores:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(store.locked(deadline))
                except OSError as exc:
                    self._warn_unusable(process, store, exc)
                    continue
                yield store
                return
        yield None

    def _warn_unusable(self, process: _ProcessState, store: _Store, exc: OSError) -> None:
        if store.label in process.warned:
            return
        process.warned.add(store.label)
        later = self.stores[self.stores.index(store) + 1 :]
        _log.warning(
            "cannot use the token cache %s (%s); %s",
            store.label,
            exc.strerror or type(exc).__name__,
            f"using {later[0].label} instead" if later else "keeping the token in memory only",
        )


class _SourceView:
    """A read-only view of a token source, for ``status`` and the tests.

    ``shared()`` reads the shared caches exactly as the token source does, so
    what ``status`` reports is what the next request would use.
    """

    def __init__(self, source: _TokenSource, api_url: str) -> None:
        self._source = source
        self.api_url = api_url
        self.endpoint = source.endpoint
        self.client_id = source.endpoint.client_id
        self.token_url = source.endpoint.url
        self.refresh_margin = source.refresh_margin
        self.stores = source.stores
        self.file_cache = source.file_cache
        #: What the hot path serves now, and until when.
        self.published = source.published
        process = source.process_state()
        #: The last record this process saw (all there is without a usable cache).
        self.remembered = process.record
        #: This process's lock around token decisions (tests hold it across a fork).
        self.thread_lock = process.lock
        #: The latest background renewal of this cache in this process, running or not.
        self.renewal = _renewals.latest.get(str(source.file_cache.path))

    def shared(self) -> tuple[str, _CacheRecord | None]:
        """Where the shared record comes from, and the record (``None``: nothing cached)."""
        problems: list[str] = []
        store, record = self._source.read_shared(self._source.process_state(), problems)
        if store is not None:
            return store.label, record
        return "; ".join([*problems, self.stores[0].label]), None


class _KeySource:
    """The token source of API-key mode: the key, always; no request, no cache."""

    renews = False

    def __init__(self, key: _Secret) -> None:
        self._published = _Published(_Token(key, 0.0, math.inf), math.inf)

    def current(self) -> _Published:
        return self._published

    def token(self, rejected: _Secret | None) -> _Published:
        return self._published

    async def atoken(self, rejected: _Secret | None) -> _Published:
        return self._published

    def clear(self) -> list[str]:
        return []


# ---- Configuration: credentials, URLs and trust, checked at construction ----


def _setting(value: str, default: str, variable: str) -> str:
    """An argument if one was given, else its variable, else the default.

    An argument left out *is* the default object, so identity tells it from the
    same URL passed explicitly (which then wins over the variable).
    """
    if value is not default:
        return value
    return _env(variable) or default


def _env_secret(name: str) -> _Secret | None:
    """A secret environment variable, masked; empty means unset."""
    return _Secret(os.environ[name]) if os.environ.get(name) else None


def _masked(value: str | None) -> _Secret | None:
    """An argument's secret, masked (an empty one stays falsy, like an empty variable)."""
    return None if value is None else _Secret(value)


def _credentials(
    client_id: str | None,
    client_secret: _Secret | None,
    api_key: _Secret | None,
    strays: dict[str, str | None],
) -> tuple[str, _Secret] | _Secret:
    """Decide the mode and its credentials; explicit arguments win.

    When any credential is given as an argument, the mode is the one those
    arguments choose and the environment only fills in the other half of a client
    id/secret pair. Otherwise everything comes from the environment. Secrets
    arrive masked and are read from the environment masked: this frame may raise.
    ``strays`` (from `_stray_variables`) lets a "missing" error name the
    misspelled variable that was meant to supply it.

    Returns the API key, or the client id and secret.
    """
    # `EdrvAuth("...")` alone: an API key passed where the client id goes.
    only_first_argument = client_id is not None and client_secret is None and api_key is None
    if api_key is not None or client_id is not None or client_secret is not None:
        if api_key is None:
            client_id = client_id or _env(_ENV_CLIENT_ID)
            client_secret = client_secret or _env_secret(_ENV_CLIENT_SECRET)
    else:
        client_id, client_secret = _env(_ENV_CLIENT_ID), _env_secret(_ENV_CLIENT_SECRET)
        api_key = _env_secret(_ENV_API_KEY)
    if api_key and (client_id or client_secret):
        raise EdrvAuthError(
            f"give either an API key ({_ENV_API_KEY}) or client credentials "
            f"({_ENV_CLIENT_ID}, {_ENV_CLIENT_SECRET}), not both"
        )
    if api_key:
        if not _TOKEN_CHARS.fullmatch(api_key.value):
            raise EdrvAuthError(
                f"the API key ({_ENV_API_KEY} or api_key=) cannot go in a header: it must be "
                "printable ASCII without spaces (a trailing newline, read from a file?)"
            )
        return api_key
    pairs = ((_ENV_CLIENT_ID, client_id), (_ENV_CLIENT_SECRET, client_secret))
    missing = [name for name, given in pairs if not given]
    if len(missing) == 2:
        raise EdrvAuthError(
            f"no eDRV credentials: set {_ENV_CLIENT_ID} and {_ENV_CLIENT_SECRET} "
            f"(or {_ENV_API_KEY}), or pass them to EdrvAuth()"
            + _meant_for((*missing, _ENV_API_KEY), strays)
        )
    if missing or client_id is None or client_secret is None:
        message = f"incomplete eDRV credentials: {missing[0]} is missing"
        if only_first_argument and missing == [_ENV_CLIENT_SECRET]:
            message += "; if the one argument you passed is an API key, pass it as api_key=..."
        raise EdrvAuthError(message + _meant_for(missing, strays))
    if not _is_text(client_id) or not _is_text(client_secret.value):
        raise EdrvAuthError(
            f"{_ENV_CLIENT_ID} and {_ENV_CLIENT_SECRET} must be text (they hold bytes that "
            "are not UTF-8)"
        )
    return client_id, client_secret


#: Every variable edrv_auth reads. Any other ``EDRV_*`` name is reported once,
#: since a misspelled one would otherwise be silently ignored.
_OUR_VARIABLES: Final = (
    _ENV_CLIENT_ID,
    _ENV_CLIENT_SECRET,
    _ENV_API_KEY,
    _ENV_TOKEN_URL,
    _ENV_AUDIENCE,
    _ENV_API_URL,
    _ENV_CACHE_DIR,
    _ENV_REDIS_URL,
)
#: The stray variables already reported in this process.
_reported_strays: set[str] = set()


def _stray_variables() -> dict[str, str | None]:
    """The ``EDRV_*`` variables set here that edrv_auth does not read, each with the
    closest name it does read (or ``None``).

    Names are compared, never values: a value may be a secret. Lower-case names
    count too (``edrv_client_id`` is ignored on POSIX). The scan costs a few
    microseconds per construction.
    """
    return {
        name: _closest_variable(name.upper())
        for name in os.environ
        if name[:5].upper() == "EDRV_" and name not in _OUR_VARIABLES
    }


@functools.lru_cache(maxsize=32)
def _closest_variable(name: str) -> str | None:
    """The variable edrv_auth reads that ``name`` most likely misspells, if any.

    A cutoff of 0.75 catches a swapped letter, a dropped underscore or a missing
    ``AUTH_``, without offering ``EDRV_CLIENT_SECRET`` for an unrelated
    ``EDRV_WEBHOOK_SECRET``. Cached: a stray name costs difflib once per process.
    """
    import difflib

    return next(iter(difflib.get_close_matches(name, _OUR_VARIABLES, 1, 0.75)), None)


def _meant_for(wanted: Sequence[str], strays: dict[str, str | None]) -> str:
    """A hint naming the stray variables whose closest name is one of ``wanted``."""
    meant = [
        f"{stray} is set: did you mean {name}?" for stray, name in strays.items() if name in wanted
    ]
    return f" ({'; '.join(meant)})" if meant else ""


def _report_strays(strays: dict[str, str | None]) -> None:
    """Warn, once per process and name, about the ``EDRV_*`` variables edrv_auth ignores.

    A log warning rather than ``warnings.warn``: the fix is in the environment,
    not in the calling line, and a test suite run with ``-W error`` must not
    fail, or pass, depending on the shell it starts from. With no logging
    configured, Python still prints it on stderr.
    """
    for stray, name in strays.items():
        if stray in _reported_strays:
            continue
        _reported_strays.add(stray)
        if name is None:
            _log.warning(
                "%s is not a variable edrv_auth reads (it reads %s)",
                stray,
                ", ".join(_OUR_VARIABLES),
            )
        else:
            _log.warning("%s is not a variable edrv_auth reads; did you mean %s?", stray, name)


def _is_text(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 (environment bytes that do not decode never do).

    A bool, never an error: the encoding error would carry the value.
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


#: Whether `_require_packages` found what client credentials need, in this
#: process (a list, so that the function needs no ``global``).
_packages_found: list[bool] = []


def _require_packages() -> None:
    """Refuse client-credentials mode at once when ``filelock`` or ``httpx`` is missing.

    The token cache needs filelock, and the token request httpx. The vendored
    file may land where one is missing; without this check a warm cache would
    work until the first renewal, which then died with a ModuleNotFoundError.
    Finding a module is cheaper than importing it, but not free (a walk of
    sys.path): once found, they are not looked for again.
    """
    if _packages_found:
        return
    import importlib.util

    missing = {}
    for name, purpose in (("filelock", "its token cache"), ("httpx", "the token request")):
        try:
            found = sys.modules.get(name) is not None or importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
            found = False
        if not found:
            missing[name] = f"{name} for {purpose}"
    if missing:
        raise EdrvAuthError(
            f"edrv_auth needs {' and '.join(missing.values())}: pip install {' '.join(missing)}"
        )
    _packages_found.append(True)


def _has_userinfo(url: str) -> bool:
    """Whether a URL names a user or password (``https://user:pw@host``)."""
    try:
        return "@" in urllib.parse.urlsplit(url).netloc
    except ValueError:
        return "@" in url


def _safe_port(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


def _checked_url(name: str, url: str) -> str:
    """Validate a configured URL: https, or http only on a loopback host.

    A URL with a user name or password is refused without being shown: it would
    otherwise reach reprs, messages and ``status``.
    """
    if _has_userinfo(url):
        raise EdrvAuthError(f"{name} must not contain a user name or password")
    try:
        scheme, host, _ = _origin(url)
    except ValueError:
        # Not echoed: a mistyped URL may still hold a password (`https:/user:pw@...`).
        raise EdrvAuthError(f"{name} is not a valid http(s) URL") from None
    if scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise EdrvAuthError(
            f"{name} must use https (http is allowed only on a loopback host, not {host})"
        )
    return url


#: A host name as resolvers and certificates take it: labels of letters, digits,
#: ``-`` and ``_`` (which some internal names use), none empty, none over 63.
_HOST_NAME: Final = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")


def _checked_token_url(url: str) -> str:
    """Validate ``token_url`` as `_checked_url` does, and as httpx will send it.

    What httpx would refuse, or send to a host no resolver takes (an empty
    label, a space, a character IDNA rejects), is refused now, in one line that
    does not echo it, and so is whitespace around it (a newline read from a
    file). A non-ASCII host is sent in its IDNA form and a non-ASCII path
    percent-encoded, as httpx does. A trailing dot is dropped: certificates
    name a host without it.
    """
    url = _checked_url("token_url", url)
    if url != url.strip() or not url.isprintable():
        raise EdrvAuthError(
            "token_url (or EDRV_TOKEN_URL) has spaces or control characters around or in it "
            "(a newline read from a file?)"
        )
    try:
        import httpx
    except ImportError:  # API-key mode without httpx: no token request will send it
        return url
    try:
        parsed: httpx.URL | None = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    host = parsed.raw_host.decode("ascii") if parsed is not None else ""
    name = host.removesuffix(".")
    # An IPv6 address (with ":") httpx has checked already; a name, not.
    if ":" not in host and (len(name) > 253 or not _HOST_NAME.fullmatch(name)):
        raise EdrvAuthError(
            "token_url (or EDRV_TOKEN_URL) cannot be sent: its host is not a valid host name"
        )
    return str(parsed.copy_with(host=name)) if parsed is not None and name != host else url


def _checked_verify(verify: object) -> bool | str | ssl.SSLContext:
    """Validate ``verify``: ``True``, a CA bundle file or folder, or a verifying SSLContext.

    ``False`` is refused: the token request carries the client secret, and
    without verification anyone on the path could read it.
    """
    if verify is True:
        return True
    if verify is False:
        raise EdrvAuthError(
            "verify=False is refused: the token request carries the client secret; pass "
            "verify= the path of a CA bundle (file or folder) or an ssl.SSLContext instead"
        )
    ssl = sys.modules.get("ssl")  # no import: without ssl loaded, it cannot be a context
    if ssl is not None and isinstance(verify, ssl.SSLContext):
        if _loosened(verify):
            raise EdrvAuthError(
                "verify= is an ssl.SSLContext that does not check certificates and host names "
                "(verify_mode CERT_REQUIRED, check_hostname True): refused, the token request "
                "carries the client secret"
            )
        return verify  # type: ignore[no-any-return]
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if not isinstance(path, str) or not path or not os.path.exists(path):
            raise EdrvAuthError(f"verify= names no CA bundle file or folder: {path!r}")
        return path
    raise EdrvAuthError(
        "verify must be True, the path of a CA bundle file or folder, or an ssl.SSLContext"
    )


# ---- Adapters' helpers: the origin guard, the one 401 policy, bodies -------


class _ApiOrigin:
    """The API's origin (scheme, host, port): the only one that receives the token.

    ``matches`` is the one origin comparison; a prefix test serves the usual
    spelling without parsing, and other spellings of the same origin (an
    explicit default port, say) are parsed.
    """

    def __init__(self, api_url: str) -> None:
        self.url = api_url
        self.origin = _origin(api_url)
        scheme, host, port = self.origin
        if scheme == "http" and port == 80:
            # requests and httpx both keep Authorization on a redirect from
            # http://host to https://host (an "upgrade"): another origin here.
            raise EdrvAuthError("an http:// api_url needs a port other than 80")
        netloc = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            netloc += f":{port}"
        self._prefix = f"{scheme}://{netloc}/"

    def matches(self, url: str | httpx.URL) -> bool:
        """Whether ``url`` (a string, or an ``httpx.URL``) is on the API's origin."""
        if isinstance(url, str):
            if url.startswith(self._prefix):
                return True
            try:
                return _origin(url) == self.origin
            except ValueError:
                return False
        scheme = url.scheme
        return (scheme, url.host, url.port or _DEFAULT_PORTS.get(scheme)) == self.origin

    def check(self, url: str | httpx.URL) -> None:
        """Raise `EdrvAuthError`, before anything is sent, for a URL on another origin."""
        if self.matches(url):
            return
        parts = urllib.parse.urlsplit(str(url))
        shown = f"{parts.scheme}://{parts.hostname or ''}" + (
            f":{parts.port}" if _safe_port(parts) else ""
        )
        raise EdrvAuthError(
            f"refusing to send the eDRV token to {shown}: only {self.url} may receive it "
            f"(set api_url or {_ENV_API_URL} to change the API's address)"
        )


def _after_response(
    answered_url: str | httpx.URL,
    header_sent: str | bytes | None,
    our_header: str,
    replayable: bool,
    origin: _ApiOrigin,
) -> Literal["keep", "renew", "resend"]:
    """The one 401 policy: what a ``401`` response means for the token that was sent.

    The adapters ask it about a ``401`` only (a ``403`` means the token is
    valid but not allowed). ``"keep"`` unless it answers a request on the
    API's origin that still carried our header. Both libraries hand the hook or flow the response
    that ends a redirect chain: a detour through another origin strips our
    header (a new token would not help), and a response from another origin is
    none of our business. Otherwise the token is replaced (``"renew"``), and
    the request is sent once more with the new one (``"resend"``) if its body
    can be sent again.
    """
    if header_sent != our_header or not origin.matches(answered_url):
        return "keep"
    return "resend" if replayable else "renew"


def _seekable(file: object) -> bool:
    seekable = getattr(file, "seekable", None)
    try:
        return bool(seekable()) if callable(seekable) else False
    except (OSError, ValueError):
        return False


_IN_MEMORY_BODIES: Final = frozenset({type(None), bytes, str, bytearray, memoryview})


def _replay_position(body: object) -> tuple[bool, int | None]:
    """Whether requests can send ``body`` again, and where to rewind it to.

    Bodies in memory replay as they are; a seekable file replays from the
    position it had; a generator or a non-seekable stream cannot be replayed.
    """
    if body is None or isinstance(body, (bytes, bytearray, memoryview, str)):
        return True, None
    if not hasattr(body, "tell") or not _seekable(body):
        return False, None
    try:
        position = body.tell()
    except (OSError, ValueError):
        return False, None
    return (True, position) if isinstance(position, int) else (False, None)


def _replayable_httpx_stream(stream: object) -> bool:
    """Whether httpx can send a request body again, identical.

    In-memory content is a ``ByteStream``. A multipart body re-renders on every
    iteration and rewinds its files itself, so it replays when each file is in
    memory or seekable. Generators and other streams are sent once only.
    """
    import httpx

    if isinstance(stream, httpx.ByteStream):
        return True
    try:
        from httpx._multipart import MultipartStream  # private to httpx: it may move
    except ImportError:  # pragma: no cover - depends on the httpx version
        return False
    if not isinstance(stream, MultipartStream):
        return False
    files = [getattr(field, "file", b"") for field in stream.fields]
    return all(isinstance(f, (bytes, str)) or _seekable(f) for f in files)


def _copy_cookies(prepared: requests.PreparedRequest, response: requests.Response) -> None:
    # As HTTPDigestAuth does, carry cookies set by the 401 into the re-sent request.
    from requests.cookies import extract_cookies_to_jar

    # requests' own annotations and types-requests differ here: each ignore covers one,
    # and may go unused under the other.
    jar: Any = prepared._cookies  # type: ignore[attr-defined, unused-ignore]
    extract_cookies_to_jar(jar, response.request, response.raw)  # type: ignore[no-untyped-call, unused-ignore]
    prepared.prepare_cookies(jar)


def _resend(
    r: requests.Response, fresh: _Published, rewind_to: int | None, kwargs: dict[str, Any]
) -> requests.Response:
    """Send the request that ``r`` answers once more, with ``fresh``'s header.

    HTTPDigestAuth's recipe: rewind the body, drain and release the
    connection, re-send a copy over the same adapter, and keep the 401 in the
    new response's history.
    """
    request = r.request
    body: object = request.body
    if rewind_to is not None and hasattr(body, "seek"):  # a 302/303 drops the body
        body.seek(rewind_to)
    r.content  # noqa: B018 - reading the body frees the connection
    r.close()
    # The fresh token also goes on `request` itself: requests builds any
    # redirect that follows from it.
    request.headers["Authorization"] = fresh.header
    prepared = request.copy()
    _copy_cookies(prepared, r)
    second: requests.Response = r.connection.send(prepared, **kwargs)
    second.history.append(r)
    second.request = prepared
    return second


def _pass_response(r: requests.Response, **kwargs: Any) -> requests.Response:
    """A disarmed retry hook."""
    return r


# ---- EdrvAuth: configuration, the three adapters ---------------------------


class EdrvAuth(_RequestsAuthBase, _HttpxAuthBase):
    """Bearer authentication for the eDRV API, for requests and httpx.

    Pass one instance as ``auth=`` to ``requests``, ``httpx.Client`` or
    ``httpx.AsyncClient``; it adds ``Authorization: Bearer ...`` to every
    request for the eDRV API and refuses to send it anywhere else::

        auth = EdrvAuth(api_key="...")          # or $EDRV_API_KEY
        auth = EdrvAuth()                       # or $EDRV_CLIENT_ID / $EDRV_CLIENT_SECRET
        requests.get("https://api.edrv.io/v1.1/chargestations", auth=auth)

    With an API key, the key is the bearer token: nothing else happens. With
    client credentials, the access token is requested when first needed,
    saved in a private per-user cache file that every process on the machine
    shares (or in Redis, for many machines), replaced shortly before it
    expires, and renewed once, transparently, when the API answers ``401``.
    Any number of threads and processes starting together make one token
    request, and never more than 5 a minute per credential set (client id
    and secret). A token due for renewal that still has more than
    ``timeout`` seconds to live is renewed in the background: no request
    waits for it.

    One instance may serve any number of threads, event loops (asyncio or
    trio) and processes: it pickles, and keeps working in a forked child.

    Args:
        client_id: The eDRV client id. Default: ``$EDRV_CLIENT_ID``.
        client_secret: The eDRV client secret. Default: ``$EDRV_CLIENT_SECRET``.
        api_key: An eDRV API key, instead of client credentials.
            Default: ``$EDRV_API_KEY``.
        token_url: The token endpoint. Default: ``$EDRV_TOKEN_URL``, else
            ``https://auth.edrv.io/oauth/token``.
        audience: The ``audience`` of the token request. Default:
            ``$EDRV_AUDIENCE``, else ``https://api.edrv.io``.
        api_url: The only origin (scheme, host, port) that ever receives the
            token. Default: ``$EDRV_API_URL``, else ``https://api.edrv.io``.
        cache_dir: The folder of the shared token file. Default:
            ``$EDRV_AUTH_CACHE_DIR``, else the user's cache folder
            (``~/.cache/edrv_auth`` on Linux).
        refresh_margin: Seconds before expiry at which a token is replaced.
        timeout: Seconds for one token request attempt, its whole answer
            included (at most 25).
        redis_url: Share the token across machines through Redis
            (needs ``pip install redis``). Default:
            ``$EDRV_AUTH_REDIS_URL``.
        verify: What the token request trusts. ``True`` (the default) trusts
            what requests and httpx trust in the same environment: the CA
            bundles named by ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
            ``SSL_CERT_FILE`` or ``SSL_CERT_DIR``, else certifi's bundle, else
            the system's store. A CA bundle file or folder, or an
            ``ssl.SSLContext``, is used as given. ``False`` is refused: the
            request carries the client secret.

    The token request goes through the proxy that ``HTTPS_PROXY`` or
    ``ALL_PROXY`` names unless ``NO_PROXY`` excludes the host, as httpx reads
    them, and each attempt ends by ``timeout``.

    An argument you pass wins over its environment variable; an empty
    variable counts as unset. Creating the object sends nothing and writes
    nothing.

    Raises:
        EdrvAuthError: At construction, for missing or conflicting credentials
            (give either an API key or a client id and secret), or a URL that
            is not ``https://`` (``http://`` only on a loopback host) or holds
            a user name or password. At request time, for a request to another
            origin than ``api_url``. ``get_token`` raises the subclass
            ``TokenRequestError`` when eDRV gives no token.

    Note:
        An instance given ``verify=`` an ``ssl.SSLContext`` does not pickle
        (pickling raises ``EdrvAuthError``): a context cannot cross processes.
        Pass the path of a CA bundle instead where instances are sent to other
        processes.
    """

    # Maintainers: configuration is checked here and handed to a token source
    # (_TokenSource, or _KeySource for an API key), which makes every token
    # decision. The three adapters (__call__ and _retry_on_401 for requests,
    # sync_auth_flow and async_auth_flow for httpx) only set the header, ask
    # the one 401 policy (_after_response), and hand a rejected token
    # back to the source.

    def __init__(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        api_key: str | None = None,
        token_url: str = _DEFAULT_TOKEN_URL,
        audience: str = _DEFAULT_AUDIENCE,
        api_url: str = _DEFAULT_API_URL,
        cache_dir: str | os.PathLike[str] | None = None,
        refresh_margin: float = 300.0,
        timeout: float = 10.0,
        redis_url: str | None = None,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    ) -> None:
        """Check the configuration; nothing is sent or written until a token is needed."""
        # Only masked secrets from here on: this frame may raise.
        secret, key = _masked(client_secret), _masked(api_key)
        redis = _masked(redis_url) or _env_secret(_ENV_REDIS_URL)  # it may hold a password
        del client_secret, api_key, redis_url
        strays = _stray_variables()
        credentials = _credentials(client_id, secret, key, strays)
        _report_strays(strays)
        if not isinstance(credentials, _Secret):
            _require_packages()  # now, not deep inside the first token request
        # The signature's defaults are the real URLs, so an argument left at its
        # default is "not given" and its environment variable applies.
        token_url = _checked_token_url(_setting(token_url, _DEFAULT_TOKEN_URL, _ENV_TOKEN_URL))
        audience = _setting(audience, _DEFAULT_AUDIENCE, _ENV_AUDIENCE)
        if _has_userinfo(audience):
            raise EdrvAuthError("audience must not contain a user name or password")
        api_url = _checked_url("api_url", _setting(api_url, _DEFAULT_API_URL, _ENV_API_URL))
        self._origin = _ApiOrigin(api_url)
        if not _is_number(refresh_margin) or refresh_margin < 0:
            raise EdrvAuthError("refresh_margin must be a number of seconds >= 0")
        if not _is_number(timeout) or not 0 < timeout <= _FETCH_DEADLINE:
            raise EdrvAuthError(
                f"timeout must be more than 0 and at most {_FETCH_DEADLINE:g} seconds, so that "
                "a token request ends before other processes stop waiting for the token cache "
                f"lock (after {_LOCK_TIMEOUT:g} s)"
            )
        verify = _checked_verify(verify)
        self._source: _TokenSource | _KeySource
        self._usual_hook: functools.partial[requests.Response] | None = None
        if isinstance(credentials, _Secret):
            self._source = _KeySource(credentials)
            return
        client_id, secret = credentials
        endpoint = _TokenEndpoint(token_url, client_id, secret, audience, float(timeout), verify)
        directory = cache_dir or _env(_ENV_CACHE_DIR)
        name = _credential_digest(token_url, audience, client_id, secret)
        file_cache = _FileCache(Path(directory) if directory else _default_cache_dir(), name)
        # Redis is shared by every machine; the file still serves when it is down.
        redis_cache = _RedisCache(redis, name) if redis else None
        self._source = _TokenSource(endpoint, file_cache, redis_cache, float(refresh_margin))

    def __repr__(self) -> str:
        if not hasattr(self, "_source"):  # __init__ raised: error reporters still call repr
            return "EdrvAuth(<not configured>)"
        view = self._describe()
        if view is None:
            return f"EdrvAuth(api_key='***', api_url={self._origin.url!r})"
        cache = ", then ".join(store.label for store in view.stores)  # Redis, then the file
        return (
            f"EdrvAuth(client_id={view.client_id!r}, api_url={self._origin.url!r}, cache={cache!r})"
        )

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_usual_hook": None}  # it holds this process's token

    def get_token(self) -> str:
        """Return a valid access token (or the API key in API-key mode).

        The token comes from memory when fresh, else from the shared cache,
        else from one token request made on behalf of every process sharing
        the cache. Use it for clients other than requests and httpx.

        Raises:
            TokenRequestError: No token could be obtained.
            EdrvAuthError: The cache lock could not be taken in time.
        """
        return (self._source.current() or self._source.token(None)).access_token.value

    async def aget_token(self) -> str:
        """Like :meth:`get_token`, without blocking the event loop.

        Works under asyncio and trio. Concurrent tasks of one event loop share one
        worker-thread job, hence one token request.
        """
        return (self._source.current() or await self._source.atoken(None)).access_token.value

    def clear(self) -> None:
        """Forget the cached token, in memory and in the shared cache.

        The record of recent token requests stays, so clearing in a loop cannot
        be used to bypass the token-request rate cap. A cache that cannot be
        changed (Redis down, a folder that is not ours) is logged as a warning.
        """
        self._source.clear()

    def _describe(self) -> _SourceView | None:
        """A read-only view of the token source (``None`` in API-key mode)."""
        if isinstance(self._source, _KeySource):
            return None
        return _SourceView(self._source, self._origin.url)

    # -- requests ------------------------------------------------------------

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        """Authenticate a requests ``PreparedRequest``, re-sending it once on a 401.

        Note:
            A body that cannot be replayed (a generator, a non-seekable stream)
            is never sent twice: on a 401 the caller receives the 401.
        """
        self._origin.check(r.url or "")
        sent = self._source.current() or self._source.token(None)
        r.headers["Authorization"] = sent.header
        if self._source.renews:
            hook = self._usual_hook  # a body in memory: one hook per token, not per request
            if type(r.body) not in _IN_MEMORY_BODIES:
                hook = functools.partial(self._retry_on_401, sent, *_replay_position(r.body))
            elif hook is None or hook.args[0] is not sent:
                hook = self._usual_hook = functools.partial(self._retry_on_401, sent, True, None)
            r.hooks["response"].append(hook)
        return r

    def _retry_on_401(
        self,
        sent: _Published,
        replayable: bool,
        rewind_to: int | None,
        r: requests.Response,
        **kwargs: Any,
    ) -> requests.Response:
        """The requests response hook: re-send a request once on a 401.

        requests also runs this hook for responses to redirected copies of the
        request; all copies share one hook list, and the hook disarms itself
        there on its first retry, so there is never a second one.
        """
        if r.status_code != 401:  # spares every other response the lookups below
            return r
        request = r.request
        verdict = _after_response(
            request.url or "",
            request.headers.get("Authorization"),
            sent.header,
            replayable,
            self._origin,
        )
        if verdict == "keep":
            return r
        try:
            fresh = self._source.token(sent.access_token)
        except BaseException:
            r.close()
            raise
        if verdict == "renew" or fresh.access_token == sent.access_token:
            return r  # a body sent once only, or the rate cap kept this token
        hooks = request.hooks["response"]
        for index, hook in enumerate(hooks):  # in place: requests may be iterating over it
            if getattr(hook, "func", None) == self._retry_on_401:
                hooks[index] = _pass_response
        return _resend(r, fresh, rewind_to, kwargs)

    # -- httpx ---------------------------------------------------------------

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Authenticate an ``httpx.Client`` request, re-sending it once on a 401."""
        self._origin.check(request.url)
        sent = self._source.current() or self._source.token(None)
        request.headers["Authorization"] = sent.header
        response = yield request
        verdict = self._verdict(request, response, sent)
        if verdict != "keep":
            fresh = self._source.token(sent.access_token)
            if verdict == "resend" and fresh.access_token != sent.access_token:
                request.headers["Authorization"] = fresh.header
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Authenticate an ``httpx.AsyncClient`` request without blocking the loop."""
        self._origin.check(request.url)
        sent = self._source.current() or await self._source.atoken(None)
        request.headers["Authorization"] = sent.header
        response = yield request
        verdict = self._verdict(request, response, sent)
        if verdict != "keep":
            fresh = await self._source.atoken(sent.access_token)
            if verdict == "resend" and fresh.access_token != sent.access_token:
                request.headers["Authorization"] = fresh.header
                yield request

    def _verdict(
        self, request: httpx.Request, response: httpx.Response, sent: _Published
    ) -> Literal["keep", "renew", "resend"]:
        """The 401 policy for an httpx response: what it answered, what it carried."""
        if response.status_code != 401 or not self._source.renews:  # spares a 200 the lookups
            return "keep"
        answered = response.request
        return _after_response(
            answered.url,
            answered.headers.get("Authorization"),
            sent.header,
            _replayable_httpx_stream(request.stream),
            self._origin,
        )


# ---- Command line -----------------------------------------------------------


def _status(auth: EdrvAuth) -> str:
    """What ``status`` prints: facts about the cache, never the token.

    It reads the shared caches through the token source's own view, so it
    reports exactly what the next request would use.
    """
    view = auth._describe()
    if view is None:
        return f"mode: API key (no token request, no cache)\napi url: {auth._origin.url}"
    now = _clock.time()
    where, record = view.shared()
    lines = [
        f"cache: {where}" + ("" if record else " (nothing usable cached)"),
        f"cache file: {view.file_cache.path}",
        f"client id: {view.client_id}",
        f"token url: {view.token_url}",
    ]
    token = record.token if record else None
    if token is None:
        lines.append("token: none cached")
    else:
        obtained = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(token.obtained_at))
        remaining = token.expires_at - now
        refresh_in = token.refresh_at(view.refresh_margin) - now
        lines += [
            f"obtained: {obtained} ({now - token.obtained_at:.0f} s ago)",
            f"expires in: {remaining:.0f} s" if remaining > 0 else "expires in: expired",
            f"refreshed in: {max(refresh_in, 0):.0f} s (refresh margin {view.refresh_margin:g} s)",
            f"scope: {token.scope or '(none)'}",
        ]
    recent = record.counted_times(now) if record else ()
    lines.append(
        f"token requests in the last {_TOKEN_REQUEST_WINDOW:.0f} s: {len(recent)} "
        f"(at most {_MAX_TOKEN_REQUESTS} per credential set: client id and secret)"
    )
    return "\n".join(lines)


class _Check(NamedTuple):
    """A ``doctor`` check: ``pass``, ``fail`` or ``skip``, and what it saw (or the fix)."""

    name: str
    result: str
    detail: str


#: The checks of the way to the endpoint, in order: a failure leaves the later ones unchecked.
_WAY: Final = ("name", "connect", "tls", "answer", "clock")


def _from(variable: str) -> str:
    """Where a setting comes from: the command line reads only the environment."""
    return variable if _env(variable) else "default"


def _bounded(call: Callable[[], Any], timeout: float) -> Any:
    """``call()``'s result or exception, or a ``TimeoutError`` after ``timeout`` seconds: it
    runs in a daemon thread, left alone at the deadline (a name lookup cannot be interrupted)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which names it
            outcome.append(exc)

    worker = threading.Thread(target=run, name="edrv_auth-check", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else TimeoutError(0, f"no answer within {timeout:g} s")


def _route(client: httpx.Client, url: httpx.URL) -> tuple[str, bool]:
    """The proxy a request for ``url`` goes through (never its password), or why none; and
    whether there is one. Read from the client's mounts, which httpx builds from the proxy
    variables and ``NO_PROXY``: what httpx decides here is what the request does."""
    import urllib.request

    import httpx

    if url.scheme != "https":
        return "none: a plain http:// URL (loopback only) never goes through a proxy", False
    proxies = urllib.request.getproxies()  # what httpx read
    mounts = getattr(client, "_mounts", {})  # private, but in every httpx since 0.25.1
    pattern = next((p for p in mounts if p.matches(url)), None)
    if pattern is None or mounts[pattern] is None:
        if proxies.get("https") or proxies.get("all"):
            return f"none: NO_PROXY excludes {url.host}", False
        return "none: neither HTTPS_PROXY nor ALL_PROXY is set", False
    scheme = pattern.pattern.partition(":")[0]  # "https" or "all"
    named = proxies[scheme]
    proxy = httpx.URL(named if "://" in named else f"http://{named}")
    where = _authority(proxy.host, proxy.port) if proxy.port else proxy.host
    secret = ", with a user name and password, not shown" if proxy.userinfo else ""
    return f"{proxy.scheme}://{where} ({scheme.upper()}_PROXY{secret})", True


def _reach(exchange: _Exchange, client: httpx.Client, proxied: bool) -> list[_Check]:
    """The checks of the way to ``exchange``'s URL, by one request without credentials
    through the token request's client, trust and deadline: httpx's ``trace`` tells the
    stage it reached, hence which check failed."""
    host = exchange.host
    checks = [_Check("name", "skip", f"{host} is resolved by the proxy, not here")]
    if not proxied:
        lookup = functools.partial(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
        found = _bounded(lookup, exchange.timeout)
        if isinstance(found, Exception):
            why = f"{host} does not resolve ({getattr(found, 'strerror', None) or 'failed'})"
            return [_Check("name", "fail", f"{why}: check {exchange.setting}, and the DNS")]
        addresses = ", ".join(sorted({address[4][0] for address in found}))
        checks = [_Check("name", "pass", f"{host} resolves to {addresses}")]
    sent = _clock.time()
    outcome = exchange.send(client, None)
    stages = {"tunnel": "connect", "send": "answer", "sent": "answer"}
    stage = stages.get(exchange.stage, exchange.stage)
    through = f" through the proxy {_authority(*exchange.proxy)}" if exchange.proxy else ""
    passed = {
        "connect": f"a TCP connection to {exchange.authority}{through}",
        "tls": f"the certificate of {host} is trusted, unexpired and valid for {host}",
        "answer": f"{exchange.peer} answered a request without credentials: HTTP "
        f"{getattr(outcome, 'status', '')} (any status will do)",
    }
    for step in _WAY[1:4]:
        if step == "tls" and not exchange.trusted:
            checks.append(_Check(step, "skip", "none: a plain http:// URL (loopback only)"))
        elif isinstance(outcome, _Answer) or _WAY.index(step) < _WAY.index(stage):
            checks.append(_Check(step, "pass", passed[step]))
        elif isinstance(outcome, _Failure) and step == stage:
            checks.append(_Check(step, "fail", str(outcome.error)))
    if isinstance(outcome, _Answer):
        checks.append(_clock_check(outcome, sent, _clock.time(), exchange.peer))
    return checks


def _clock_check(answer: _Answer, sent: float, received: float, peer: str) -> _Check:
    """This machine's clock against the ``Date`` of ``peer``'s answer (whole seconds).
    Beyond `_CLOCK_SKEW`, machines sharing tokens disagree about when they expire."""
    import email.utils

    try:
        date = email.utils.parsedate_to_datetime(answer.headers.get("Date", "")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return _Check("clock", "skip", f"{peer} sent no Date header to compare with")
    ahead, behind = sent - (date + 1), date - received
    off = max(ahead, behind, 0.0)
    if off <= _CLOCK_SKEW:
        limit = f"(over {_CLOCK_SKEW:g} s fails)"
        return _Check("clock", "pass", f"within {off + 1:.0f} s of {peer}'s Date header {limit}")
    side = "ahead of" if ahead > 0 else "behind"
    return _Check(
        "clock",
        "fail",
        f"this machine's clock is {off:.0f} s {side} {peer}'s Date header: set it right (NTP); "
        "so far off, tokens shared across machines look expired too early or valid too long, "
        "and certificates not yet valid or expired",
    )


def _cache_checks(view: _SourceView, timeout: float, settings: dict[str, str]) -> list[_Check]:
    """The cache folder (owner, mode, usable) and Redis (reachable); nothing is written."""
    cache = view.file_cache
    settings["cache file"] = f"{cache.path} ({_from(_ENV_CACHE_DIR)})"
    settings["cache folder"] = "not there yet: created 0700 at the first token request"
    with contextlib.suppress(OSError):
        info = os.lstat(cache.directory)
        yours = " (you)" * (info.st_uid == getattr(os, "getuid", lambda: None)())
        settings["cache folder"] = (
            f"owner uid {info.st_uid}{yours}, mode {info.st_mode & 0o7777:04o}"
        )
    try:
        loose = cache.check_dir()  # raises for a folder the token source would not use
        existing = next(p for p in (cache.directory, *cache.directory.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise _Unusable(f"{existing} is not writable here")
        checks = [_Check("cache", "pass", "usable" + " (made 0700 when used)" * loose)]
    except OSError as exc:
        why = f"{cache.directory} cannot hold the token cache ({exc.strerror})"
        fix = f"each process keeps its own token; set {_ENV_CACHE_DIR} to a folder of yours"
        checks = [_Check("cache", "fail", f"{why}: {fix}")]
    redis = next((store for store in view.stores if isinstance(store, _RedisCache)), None)
    settings["redis"] = f"{redis.label} ({_ENV_REDIS_URL})" if redis else "not configured"
    if redis is not None:
        pong = _bounded(functools.partial(redis._call, lambda r: r.ping()), timeout)
        why = f"{redis.label} cannot be used ({getattr(pong, 'strerror', None) or 'failed'})"
        fix = f"each machine falls back on its file; check {_ENV_REDIS_URL} and the server"
        failed = isinstance(pong, Exception)
        detail = f"{why}: {fix}" if failed else f"{redis.label} answers"
        checks.append(_Check("redis", "fail" if failed else "pass", detail))
    return checks


def _fetch(auth: EdrvAuth, client: httpx.Client, trusted: str, timeout: float) -> _Check:
    """``--fetch``: a token as the adapters get one; with an API key, one API request with it."""
    if isinstance(auth._source, _KeySource):
        url = urllib.parse.urljoin(auth._origin.url, "/v1.1/chargestations?limit=1")
        outcome = _Exchange(url, timeout, trusted, "the API", _ENV_API_URL).send(client, None, auth)
        if isinstance(outcome, _Failure):
            return _Check("fetch", "fail", str(outcome.error))
        said = f"the API answered HTTP {outcome.status} to GET {url} with the key"
        if outcome.status == 401:
            return _Check("fetch", "fail", f"{said}: it refuses the key; check {_ENV_API_KEY}")
        return _Check("fetch", "fail" if outcome.status >= 500 else "pass", said)
    try:
        token = auth._source.request_now().token
    except EdrvAuthError as exc:
        return _Check("fetch", "fail", str(exc))
    now, view = _clock.time(), auth._describe()
    counted = len(view.remembered.counted_times(now)) if view else 0
    return _Check(
        "fetch",
        "pass",
        f"a new token, its token request counted towards the cap ({counted} of at most "
        f"{_MAX_TOKEN_REQUESTS} in the last {_TOKEN_REQUEST_WINDOW:.0f} s); lifetime "
        f"{token.expires_at - token.obtained_at:.0f} s, scope {token.scope or '(none)'}",
    )


def _doctor(auth: EdrvAuth, fetch: bool) -> dict[str, Any]:
    """What ``doctor`` reports: the settings in effect, then the checks; never a secret."""
    import httpx

    view = auth._describe()
    versions = (
        f"edrv_auth {__version__}, Python {sys.version.split()[0]}, httpx {httpx.__version__}"
    )
    settings = {"version": versions, "mode": f"API key, from {_ENV_API_KEY} (never shown)"}
    url, peer, setting = auth._origin.url, "the API", _ENV_API_URL
    verify: bool | str | ssl.SSLContext = True
    timeout = 10.0  # EdrvAuth's default: API-key mode keeps none
    if view is not None:
        settings["mode"] = (
            f"client credentials, from {_ENV_CLIENT_ID} and {_ENV_CLIENT_SECRET} (never shown)"
        )
        settings["client id"] = f"{view.client_id} ({_ENV_CLIENT_ID})"
        settings["token url"] = f"{view.token_url} ({_from(_ENV_TOKEN_URL)})"
        settings["audience"] = f"{view.endpoint.audience} ({_from(_ENV_AUDIENCE)})"
        url, peer, setting = view.token_url, "the token endpoint", _ENV_TOKEN_URL
        verify, timeout = view.endpoint.verify, view.endpoint.timeout
    settings["api url"] = f"{auth._origin.url} ({_from(_ENV_API_URL)})"
    checks = _cache_checks(view, timeout, settings) if view else []
    target = httpx.URL(url)
    trust = _trust(verify) if target.scheme == "https" else (None, "")
    plain = "none: plain http://"
    settings["trusted CAs"] = "none usable" if isinstance(trust, str) else trust[1] or plain
    if isinstance(trust, str):  # a CA bundle that cannot be loaded
        way = [_Check("tls", "fail", trust)]
    elif isinstance(client := _client(trust[0]), str):  # a proxy URL httpx cannot use
        way = [_Check("connect", "fail", client)]
    else:
        settings["proxy"], proxied = _route(client, target)
        way = _reach(_Exchange(url, timeout, trust[1], peer, setting), client, proxied)
        if fetch and all(check.result != "fail" for check in way):
            way.append(_fetch(auth, client, trust[1], timeout))
    sends = "only --fetch sends credentials" if fetch else "none sends credentials"
    settings["checks"] = f"of {peer} {url}, each within {timeout:g} s; {sends}"
    found = {check.name: check for check in way}
    unchecked = _Check("", "skip", "not checked: another check failed")
    checks += [found.get(name, unchecked._replace(name=name)) for name in _WAY + ("fetch",) * fetch]
    failed = [check.name for check in checks if check.result == "fail"]
    return {"settings": settings, "checks": [c._asdict() for c in checks], "failed": failed}


def _render(report: dict[str, Any]) -> str:
    """``doctor``'s report as text: a line per setting, then a line per check; a value with
    a line break or an escape code in it (a variable's) cannot add lines or colours."""
    lines = [f"{key}: {value}" for key, value in report["settings"].items()]
    lines += [f"{c['result'].upper():4}  {c['name']}: {c['detail']}" for c in report["checks"]]
    failed = report["failed"]
    lines.append(f"failed: {', '.join(failed)}" if failed else "all checks passed")
    return "\n".join(_clean(line, limit=len(line)) for line in lines)


def _error_line(exc: EdrvAuthError) -> str:
    """An error as the one stderr line, prefixed once (never "edrv_auth: edrv_auth needs")."""
    message = str(exc)
    return "edrv_auth: " + message.removeprefix("edrv_auth ")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edrv_auth token|status|clear|doctor``; returns the exit status.

    Exit status: 0 success; 1 the token or the cache failed (a wrong secret,
    eDRV unreachable, a stuck lock); 2 a usage or configuration error (no
    credentials, a bad URL); 130 interrupted.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m edrv_auth"
        if getattr(sys.modules["__main__"].__spec__, "name", "").startswith("edrv_auth")
        else None,
        description="Get, inspect or clear the cached eDRV access token, or check the setup.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration:\n"
        "  EDRV_CLIENT_ID and EDRV_CLIENT_SECRET (or EDRV_API_KEY), and the other\n"
        "  EDRV_* variables described in the README\n\n"
        "exit status:\n"
        "  0  success\n"
        "  1  the token request or the cache failed (wrong secret, eDRV unreachable)\n"
        "  2  usage or configuration error (no credentials, a bad URL)\n"
        "  130  interrupted (Ctrl-C)",
    )
    parser.add_argument("--version", action="version", version=f"edrv_auth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "token",
        help="print a valid access token and nothing else",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print a valid access token (requesting one if needed) and nothing else:\n\n"
        '  token=$(python -m edrv_auth token) && curl -H "Authorization: Bearer $token" URL\n\n'
        "The && stops there when no token could be had, instead of sending an empty one.",
    )
    commands.add_parser(
        "status",
        help="show the cache file and the token's age, lifetime and scope",
        description="Show the cache file, when the cached token was obtained, how long it has "
        "left and its scope. Never prints the token, and never requests one.",
    )
    commands.add_parser(
        "clear",
        help="remove the cached token",
        description="Remove the cached token from disk; the next use requests a new one.",
    )
    doctor = commands.add_parser(
        "doctor",
        help="show the settings in effect and check the way to eDRV",
        description="Show the settings in effect (never a secret), then check, each within "
        "timeout, that the token endpoint's name resolves, that it can be reached (through "
        "the proxy, if one applies), its TLS certificate, and this machine's clock; with an "
        "API key, the API instead. None of these sends the credentials. Exit status 0 when "
        "every check passes, 1 otherwise.",
    )
    doctor.add_argument(
        "--fetch",
        action="store_true",
        help="also make one token request (counted towards the cap of 5 a minute; a token "
        "already cached stays in use if it fails), or send the API key in one API request",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if not _log.hasHandlers():
        # Logging is not configured, as usual for a command: warnings (a misspelled
        # EDRV_* variable, an unusable cache folder) go to stderr like the errors.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("edrv_auth: %(message)s"))
        handler.setLevel(logging.WARNING)
        _log.addHandler(handler)
    try:
        auth = EdrvAuth()
    except EdrvAuthError as exc:
        print(_error_line(exc), file=sys.stderr)
        return 2
    try:
        if args.command == "token":
            print(auth.get_token())
        elif args.command == "clear":
            failed = auth._source.clear()
            if failed:
                print(
                    f"edrv_auth: could not clear the cached token in {', '.join(failed)}",
                    file=sys.stderr,
                )
                return 1
            cleared = auth._source.renews
            print("cleared the cached token" if cleared else "API key mode: no cache")
        elif args.command == "doctor":
            try:
                report = _doctor(auth, args.fetch)
            except ImportError:  # an API key needs no httpx, but the checks do
                print("edrv_auth: doctor's checks need httpx: pip install httpx", file=sys.stderr)
                return 1
            print(json.dumps(report, indent=2) if args.json else _render(report))
            return 1 if report["failed"] else 0
        else:
            print(_status(auth))
    except EdrvAuthError as exc:
        print(_error_line(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): say nothing more, as the Python
        # docs recommend, and keep the interpreter from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
