"""The synchronous implementations compared by the benchmarks, as they run in a child process.

Each one is set up the way its documentation suggests for a client-credentials token:

- ``static/*``: a fixed ``Authorization: Bearer`` header, the physical limit (its token is
  minted directly by the fake, so it costs no token request);
- ``edrv_auth/*``: one ``EdrvAuth()`` per process, from the ``EDRV_*`` variables;
- ``naive/requests``: "fetch once per process": one token POST when the process starts its
  work, then a static header;
- ``authlib/*``: ``OAuth2Session`` / ``OAuth2Client`` with ``grant_type=client_credentials``
  and ``token_endpoint``, one per process, shared by its threads. Authlib re-fetches such a
  token by itself once it expires, but raises ``MissingTokenError`` without a first token, so
  it starts with an already-expired placeholder token: its first request auto-fetches. eDRV
  needs ``audience`` in the token request, which authlib's auto-fetch does not send, so the
  credentials go in the form (``client_secret_post``) through a registered client auth method
  that also adds the audience;
- ``requests-auth`` / ``httpx-auth``: ``OAuth2ClientCredentials(..., audience=...)`` with the
  library's ``JsonTokenFileCache`` in the benchmark's cache folder, shared by all processes.
  Both send the client credentials as HTTP Basic auth; while the fake does not accept that,
  ``basic_shim`` moves them into the form (the only change to their behaviour).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from _common import Settings

#: A function that makes one GET to the API and returns the HTTP status.
Getter = Callable[[], int]
#: Timeout of every benchmark request, in seconds.
REQUEST_TIMEOUT = 30.0


class Impl:
    """One implementation in one process: per-thread getters sharing per-process state."""

    name = ""
    library = "requests"
    #: The peer library's import name, if this is a peer.
    peer: str | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closers: list[Callable[[], object]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Called once per process when the work starts (after "go"), before any getter."""

    def getter(self) -> Getter:
        """A getter for one thread (a keep-alive session or client of its own)."""
        raise NotImplementedError

    def apply(self) -> Callable[[Any], object] | None:
        """For the micro benchmark: apply the auth to one request object (None: not offered)."""
        return None

    def close(self) -> None:
        """Close every session and client this implementation opened."""
        for closer in self._closers:
            closer()

    # Helpers for subclasses.

    def _requests_session(self, **attributes: Any) -> Any:
        import requests

        session = requests.Session()
        for name, value in attributes.items():
            setattr(session, name, value)
        with self._lock:
            self._closers.append(session.close)
        return session

    def _httpx_client(self, **options: Any) -> Any:
        import httpx

        client = httpx.Client(timeout=REQUEST_TIMEOUT, **options)
        with self._lock:
            self._closers.append(client.close)
        return client


def _requests_getter(session: Any, url: str, **kwargs: Any) -> Getter:
    def get() -> int:
        return int(session.get(url, timeout=REQUEST_TIMEOUT, **kwargs).status_code)

    return get


def _httpx_getter(client: Any, url: str) -> Getter:
    def get() -> int:
        return int(client.get(url).status_code)

    return get


# ---- The physical limit ----------------------------------------------------


def _static_header(token: str) -> Callable[[Any], object]:
    """Set ``Authorization: Bearer <token>`` on a request by hand, the floor of any auth."""
    header = f"Bearer {token}"

    def by_hand(request: Any) -> object:
        request.headers["Authorization"] = header
        return request

    return by_hand


def _first_step(flow: Callable[[Any], Any]) -> Callable[[Any], object]:
    """Run an httpx auth flow up to its first yield (which sets the request's headers)."""
    return lambda request: (step := flow(request), next(step))[0]


class StaticRequests(Impl):
    name, library = "static/requests", "requests"

    def getter(self) -> Getter:
        session = self._requests_session()
        session.headers["Authorization"] = f"Bearer {self.settings.static_token}"
        return _requests_getter(session, self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return _static_header(self.settings.static_token)


class StaticHttpx(Impl):
    name, library = "static/httpx", "httpx"

    def getter(self) -> Getter:
        client = self._httpx_client(
            headers={"Authorization": f"Bearer {self.settings.static_token}"}
        )
        return _httpx_getter(client, self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return _static_header(self.settings.static_token)


# ---- edrv_auth ---------------------------------------------------------------


class EdrvRequests(Impl):
    name, library = "edrv_auth/requests", "requests"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        import edrv_auth

        self.auth = edrv_auth.EdrvAuth()

    def getter(self) -> Getter:
        return _requests_getter(self._requests_session(auth=self.auth), self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return self.auth


class EdrvHttpx(EdrvRequests):
    name, library = "edrv_auth/httpx", "httpx"

    def getter(self) -> Getter:
        return _httpx_getter(self._httpx_client(auth=self.auth), self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return _first_step(self.auth.sync_auth_flow)


# ---- Naive: fetch once per process -------------------------------------------


class NaiveRequests(Impl):
    name, library = "naive/requests", "requests"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.headers: dict[str, str] = {}

    def start(self) -> None:
        import requests

        if self.headers:
            return
        s = self.settings
        form = {
            "grant_type": "client_credentials",
            "client_id": s.client_id,
            "client_secret": s.client_secret,
            "audience": s.audience,
        }
        response = requests.post(s.token_url, data=form, timeout=REQUEST_TIMEOUT)
        response.raise_for_status()
        self.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def getter(self) -> Getter:
        return _requests_getter(self._requests_session(), self.settings.url, headers=self.headers)


# ---- authlib -----------------------------------------------------------------

#: An expired placeholder: authlib's client-credentials auto-fetch starts from it.
AUTHLIB_PLACEHOLDER = {"access_token": "none-yet", "token_type": "bearer", "expires_at": 0}


def authlib_form_auth(audience: str) -> tuple[str, Callable[..., Any]]:
    """A client auth method for authlib: ``client_secret_post`` plus eDRV's audience."""
    from authlib.common.urls import add_params_to_qs
    from authlib.oauth2.auth import encode_client_secret_post

    def encode(client: Any, method: str, uri: str, headers: Any, body: Any) -> Any:
        uri, headers, body = encode_client_secret_post(client, method, uri, headers, body)
        if isinstance(body, bytes):
            body = body.decode()
        body = add_params_to_qs(body or "", [("audience", audience)])
        if "Content-Length" in headers:
            headers["Content-Length"] = str(len(body))
        return uri, headers, body

    return "edrv_form", encode


def authlib_options(settings: Settings) -> dict[str, Any]:
    """Constructor arguments shared by authlib's requests and httpx clients."""
    return {
        "client_id": settings.client_id,
        "client_secret": settings.client_secret,
        "token_endpoint_auth_method": "edrv_form",
        "token": dict(AUTHLIB_PLACEHOLDER),
        "token_endpoint": settings.token_url,
        "grant_type": "client_credentials",
    }


class AuthlibRequests(Impl):
    name, library, peer = "authlib/requests", "requests", "authlib"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        from authlib.integrations.requests_client import OAuth2Session

        self.session = OAuth2Session(**authlib_options(settings), default_timeout=REQUEST_TIMEOUT)
        self.session.register_client_auth_method(authlib_form_auth(settings.audience))
        self._closers.append(self.session.close)

    def getter(self) -> Getter:
        return _requests_getter(self.session, self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return self.session.token_auth  # type: ignore[no-any-return]


class AuthlibHttpx(Impl):
    name, library, peer = "authlib/httpx", "httpx", "authlib"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "use httpx2": a deprecation notice, not an error
            from authlib.integrations.httpx_client import OAuth2Client

        self.client = OAuth2Client(**authlib_options(settings), timeout=REQUEST_TIMEOUT)
        self.client.register_client_auth_method(authlib_form_auth(settings.audience))
        self._closers.append(self.client.close)

    def getter(self) -> Getter:
        return _httpx_getter(self.client, self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return _first_step(self.client.token_auth.sync_auth_flow)


# ---- requests-auth and httpx-auth ---------------------------------------------


def _client_credentials(module: Any, settings: Settings) -> Any:
    """``module``'s (requests_auth or httpx_auth) client-credentials auth, JSON file cache."""
    path = Path(settings.cache_dir) / f"{module.__name__}_tokens.json"
    module.OAuth2.token_cache = module.JsonTokenFileCache(str(path))
    return module.OAuth2ClientCredentials(
        settings.token_url,
        settings.client_id,
        settings.client_secret,
        audience=settings.audience,
        timeout=int(REQUEST_TIMEOUT),
    )


def requests_auth_peer(settings: Settings) -> Any:
    """requests-auth's client-credentials auth with its JSON file cache."""
    import requests_auth

    auth = _client_credentials(requests_auth, settings)
    if settings.basic_shim:
        auth.session.auth = None  # it set (client_id, client_secret): HTTP Basic
        auth.data.update(client_id=settings.client_id, client_secret=settings.client_secret)
    return auth


def httpx_auth_peer(settings: Settings) -> Any:
    """httpx-auth's client-credentials auth with its JSON file cache."""
    import httpx_auth

    auth = _client_credentials(httpx_auth, settings)
    if settings.basic_shim:

        def configure(client: Any) -> None:  # its own sets client.auth = (id, secret): Basic
            client.timeout = auth.timeout

        auth._configure_client = configure  # type: ignore[method-assign]
        auth.data.update(client_id=settings.client_id, client_secret=settings.client_secret)
    return auth


class RequestsAuth(Impl):
    name, library, peer = "requests-auth", "requests", "requests_auth"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.auth = requests_auth_peer(settings)

    def getter(self) -> Getter:
        return _requests_getter(self._requests_session(auth=self.auth), self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return self.auth  # type: ignore[no-any-return]


class HttpxAuth(Impl):
    name, library, peer = "httpx-auth", "httpx", "httpx_auth"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.auth = httpx_auth_peer(settings)

    def getter(self) -> Getter:
        return _httpx_getter(self._httpx_client(auth=self.auth), self.settings.url)

    def apply(self) -> Callable[[Any], object]:
        return _first_step(self.auth.sync_auth_flow)


IMPLS: dict[str, type[Impl]] = {
    impl.name: impl
    for impl in (
        StaticRequests,
        EdrvRequests,
        NaiveRequests,
        AuthlibRequests,
        RequestsAuth,
        StaticHttpx,
        EdrvHttpx,
        AuthlibHttpx,
        HttpxAuth,
    )
}

#: The implementations that fetch tokens (all but the static header), in table order.
TOKEN_FETCHERS = [
    "edrv_auth/requests",
    "edrv_auth/httpx",
    "naive/requests",
    "authlib/requests",
    "authlib/httpx",
    "requests-auth",
    "httpx-auth",
]


def missing_peer(name: str) -> str | None:
    """The PyPI name of the peer an implementation needs, if it is not installed."""
    from _common import PEERS, peer_available

    peer = IMPLS[name].peer
    return PEERS[peer] if peer is not None and not peer_available(peer) else None


def installed(names: Iterable[str], notes: list[str]) -> list[str]:
    """The implementations among ``names`` whose peer is installed; a note for each other."""
    kept = []
    for name in names:
        missing = missing_peer(name)
        if missing:
            notes.append(f"{name}: skipped, {missing} is not installed")
        else:
            kept.append(name)
    return kept
