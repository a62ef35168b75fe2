"""The token request trusts, routes and times out like requests and httpx do.

Real TLS and real tunnels: the fake eDRV serves HTTPS at ``https://localhost:PORT`` with a
certificate from a throwaway CA, token endpoint and API both; a CONNECT proxy on loopback
records the tunnels it opens; raw-socket endpoints drip their answers. For requests and for
httpx, each way of trusting the CA (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
``SSL_CERT_FILE``, ``SSL_CERT_DIR``, ``verify=`` a path or an ``SSLContext``, certifi as the
default) makes both the library's own request and our token request work, and each way of
routing (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) routes both alike. Where the library
itself does not read a variable (requests ignores ``SSL_CERT_FILE``, httpx ignores
``REQUESTS_CA_BUNDLE``), the library is given its own ``verify=`` and the variable still has
to work for the token request.
"""

from __future__ import annotations

import _thread
import contextlib
import http.client
import json
import os
import pickle
import re
import socket
import ssl
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
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    ROOT,
    Clock,
    LeakWatch,
    MakeAuth,
    auth_maker,
    run_python,
    serve_watched,
)
from fake_edrv import FakeEdrv
from test_leaks import reporter_view
from transport_helpers import (
    ConnectProxy,
    DripServer,
    RawServer,
    Socks5Proxy,
    TestCA,
    blackhole,
)

import edrv_auth
from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError

LIBRARIES = ["requests", "httpx"]


# ---- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The CA that issued the TLS fake's certificate, as a bundle file and a hashed folder."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """Another CA, which issued nothing the fake uses: trusting it alone trusts nothing here."""
    return TestCA(tmp_path_factory.mktemp("stranger"))


@pytest.fixture
def tls_fake(ca: TestCA, leak_watch: LeakWatch) -> Iterator[FakeEdrv]:
    """The fake eDRV over TLS at https://localhost:PORT."""
    server = FakeEdrv(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, tls=ca.server_context())
    yield from serve_watched(server, leak_watch)


@pytest.fixture
def make_tls_auth(tls_fake: FakeEdrv, clean_env: Path) -> MakeAuth:
    """Build an EdrvAuth pointed at the TLS fake, with the test's cache folder."""
    return auth_maker(tls_fake, cache_dir=clean_env)


@pytest.fixture
def ca_in_env(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the CA through the environment, for requests and httpx alike."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    with ConnectProxy() as server:
        yield server


def _api_call(library: str, auth: EdrvAuth, url: str, verify: Any = None) -> int:
    """One API call through the library's own client; ``verify`` only where it needs one."""
    if library == "requests":
        with requests.Session() as session:
            extra = {} if verify is None else {"verify": verify}
            return session.get(url, auth=auth, timeout=10, **extra).status_code
    # httpx deprecates verify=<path>: give it a context for the same CA.
    with httpx.Client(auth=auth, verify=True if verify is None else verify, timeout=10) as client:
        return client.get(url).status_code


def _port(server: FakeEdrv) -> int:
    return int(server.url.rpartition(":")[2])


def _cap_record(auth: EdrvAuth) -> tuple[float, ...]:
    """The token requests counted towards the storm cap, in memory or in the file."""
    state = auth._describe().file_cache.read()
    return tuple(
        sorted({*auth._describe().remembered.requests, *(state.requests if state else ())})
    )


# ---- trust: each route, with requests and with httpx --------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize(
    "route",
    ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"],
)
def test_ca_variable_is_trusted_like_the_library_trusts_it(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    library: str,
    route: str,
) -> None:
    """A CA named by the variable makes the token request and the API call succeed over TLS."""
    monkeypatch.setenv(route, str(ca.folder if route == "SSL_CERT_DIR" else ca.bundle))
    reads_it = {
        "requests": {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"},
        "httpx": {"SSL_CERT_FILE", "SSL_CERT_DIR"},
    }[library]
    verify = None
    if route not in reads_it:  # the library needs its own setting; ours must still work
        verify = str(ca.bundle) if library == "requests" else ca.client_context()
    auth = make_tls_auth()
    assert _api_call(library, auth, f"{tls_fake.url}/v1.1/chargestations", verify) == 200
    assert (tls_fake.token_requests, tls_fake.api_requests) == (1, 1)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("form", ["file", "folder", "pathlike", "context"])
def test_verify_argument_is_used_as_given(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    library: str,
    form: str,
) -> None:
    """verify= a bundle file, a hashed folder, a Path or an SSLContext trusts that CA."""
    verify: Any = {
        "file": str(ca.bundle),
        "folder": str(ca.folder),
        "pathlike": ca.bundle,
        "context": ca.client_context(),
    }[form]
    auth = make_tls_auth(verify=verify)
    library_verify = str(ca.bundle) if library == "requests" else ca.client_context()
    assert _api_call(library, auth, f"{tls_fake.url}/v1.1/x", library_verify) == 200
    assert tls_fake.token_requests == 1


def test_verify_path_wins_over_the_environment(
    make_tls_auth: MakeAuth,
    ca: TestCA,
    stranger: TestCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify= a path replaces what the variables name: an explicit argument wins."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stranger.bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger.bundle))
    assert make_tls_auth(verify=str(ca.bundle)).get_token()
    with pytest.raises(TokenRequestError, match="not trusted"):
        make_tls_auth(cache_dir=Path(os.environ["EDRV_AUTH_CACHE_DIR"]) / "other").get_token()


@pytest.mark.parametrize(
    ("requests_variable", "httpx_variable"),
    [("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"), ("CURL_CA_BUNDLE", "SSL_CERT_DIR")],
)
@pytest.mark.parametrize("which", ["requests", "httpx"])
def test_requests_and_httpx_variables_together_trust_both(
    make_tls_auth: MakeAuth,
    ca: TestCA,
    stranger: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    requests_variable: str,
    httpx_variable: str,
    which: str,
) -> None:
    """One variable of each library set, naming different CAs: the token request trusts both,
    so whichever library the caller uses, what works for it works for the token request."""
    folder = httpx_variable == "SSL_CERT_DIR"
    named = {
        requests_variable: ca.bundle if which == "requests" else stranger.bundle,
        httpx_variable: (ca if which == "httpx" else stranger).folder
        if folder
        else (ca if which == "httpx" else stranger).bundle,
    }
    for variable, path in named.items():
        monkeypatch.setenv(variable, str(path))
    assert make_tls_auth().get_token()


_CERTIFI_CHILD = """
import sys, certifi
certifi.where = lambda: sys.argv[1]  # before requests reads it at import
import httpx, requests, edrv_auth
auth = edrv_auth.EdrvAuth("{client_id}", sys.argv[2], token_url=sys.argv[3] + "/oauth/token",
                          api_url=sys.argv[3], cache_dir=sys.argv[4])
url = sys.argv[3] + "/v1.1/x"
if sys.argv[5] == "requests":
    status = requests.get(url, auth=auth, timeout=10).status_code
else:
    with httpx.Client(auth=auth) as client:
        status = client.get(url).status_code
print(status, flush=True)
"""


@pytest.mark.parametrize("library", LIBRARIES)
def test_certifi_is_the_default_trust(
    tls_fake: FakeEdrv, ca: TestCA, clean_env: Path, library: str
) -> None:
    """With no variable and no verify=, certifi's bundle is trusted, as by both libraries."""
    code = _CERTIFI_CHILD.format(client_id=CLIENT_ID)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(ROOT)
    args = [str(ca.bundle), CLIENT_SECRET, tls_fake.url, str(clean_env), library]
    result = run_python("-c", code, *args, env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "200"), result.stderr
    assert tls_fake.token_requests == 1


def test_without_certifi_the_system_store_is_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without certifi (vendored, slim image) the system's CA store is what is trusted."""
    monkeypatch.setitem(sys.modules, "certifi", None)  # `import certifi` now fails
    trust = edrv_auth._trust(True)
    assert not isinstance(trust, str)
    context, label = trust
    assert label == "the system's CA store"
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_context_is_built_once_per_process(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SSL context for one trust configuration is built once, not per token request."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.bundle))
    first, second = edrv_auth._trust(True), edrv_auth._trust(True)
    assert not isinstance(first, str)
    assert not isinstance(second, str)
    assert first[0] is second[0]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.folder))  # another configuration
    third = edrv_auth._trust(True)
    assert not isinstance(third, str)
    assert third[0] is not first[0]


@pytest.mark.parametrize("library", LIBRARIES)
def test_untrusted_certificate_names_the_fix_and_is_not_retried_or_counted(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    stranger: TestCA,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list[float],
    leak_watch: LeakWatch,
    library: str,
) -> None:
    """A certificate from a CA nobody named: a clear error, no retry, nothing counted."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stranger.bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger.bundle))
    auth = make_tls_auth()
    for _ in range(edrv_auth._MAX_TOKEN_REQUESTS + 2):  # never reaches the storm cap
        with pytest.raises(TokenRequestError) as info:
            _api_call(library, auth, f"{tls_fake.url}/v1.1/x", ca.client_context())
        message = str(info.value)
        assert "certificate of the token endpoint" in message
        assert "is not trusted" in message
        for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "verify="):
            assert name in message
        assert "could not reach" not in message
        assert "check the network" not in message
        assert info.value.status_code is None
        assert leak_watch.leaks(message, *(text for _, text in reporter_view(info.value))) == []
    assert no_sleep == []
    assert _cap_record(auth) == ()
    assert (tls_fake.token_requests, tls_fake.api_requests) == (0, 0)


def _refused_certificate(tls: ssl.SSLContext, bundle: Path, cache_dir: Path) -> str:
    """The error of a token request to a fake serving TLS with ``tls``, trusting ``bundle``:
    nothing may have reached the fake, nor counted towards the cap."""
    with FakeEdrv(tls=tls) as server:
        auth = EdrvAuth(
            CLIENT_ID,
            CLIENT_SECRET,
            token_url=server.token_url,
            cache_dir=cache_dir,
            verify=str(bundle),
        )
        with pytest.raises(TokenRequestError) as info:
            auth.get_token()
        assert server.token_requests == 0
    assert _cap_record(auth) == ()
    return str(info.value)


def test_hostname_mismatch_says_so(
    ca: TestCA, tmp_path: Path, clean_env: Path, no_sleep: list[float]
) -> None:
    """A certificate for another name: "not valid for localhost (hostname mismatch)"."""
    folder = tmp_path / "other-name"
    folder.mkdir()
    other = TestCA(folder, names=("auth.example",))
    message = _refused_certificate(other.server_context(), other.bundle, clean_env)
    assert "not valid for localhost (hostname mismatch" in message
    assert no_sleep == []


@pytest.mark.parametrize("library", LIBRARIES)
def test_stale_variable_of_the_other_library_breaks_nothing(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    leak_watch: LeakWatch,
    library: str,
) -> None:
    """A leftover variable naming a file that is gone, of the library the caller does not use
    (requests never reads SSL_CERT_FILE, httpx never reads REQUESTS_CA_BUNDLE): the token
    request works as the caller's own requests do, and says once in the log what it skipped."""
    stale = tmp_path / "gone.pem"
    own, other = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")[:: 1 if library == "requests" else -1]
    monkeypatch.setenv(own, str(ca.bundle))
    monkeypatch.setenv(other, str(stale))
    auth = make_tls_auth()
    assert _api_call(library, auth, f"{tls_fake.url}/v1.1/x") == 200
    auth.clear()
    assert make_tls_auth().get_token()  # a second token request: no second log line
    skipped = [m for m in leak_watch.messages if "does not exist" in m]
    assert skipped == [f"{other} names {stale}, which does not exist: not trusted"]
    assert tls_fake.token_requests == 2


def test_only_missing_bundles_named_means_certifi(
    make_tls_auth: MakeAuth, tls_fake: FakeEdrv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When every variable names a missing file, the default applies: certifi's bundle."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "gone.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "gone"))
    with pytest.raises(TokenRequestError, match="not trusted") as info:
        make_tls_auth().get_token()
    assert "trusted here: certifi " in str(info.value)
    assert tls_fake.token_requests == 0


def test_expired_certificate_is_called_expired(
    ca: TestCA, clean_env: Path, no_sleep: list[float]
) -> None:
    """A certificate past its end date: "has expired", not "not trusted"; final, not counted."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    expired = _tls(ca, "localhost", not_before=now - 2 * day, not_after=now - day)
    message = _refused_certificate(expired, ca.bundle, clean_env)
    assert "has expired" in message
    assert "not trusted" not in message
    assert no_sleep == []


def test_bundle_that_cannot_be_loaded_is_named(
    make_tls_auth: MakeAuth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable naming a file that is not a CA bundle: the error names the variable and path."""
    garbage = tmp_path / "not-a-bundle.pem"
    garbage.write_text("not a certificate\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(garbage))
    with pytest.raises(TokenRequestError, match="cannot load the CA certificates") as info:
        make_tls_auth().get_token()
    assert f"REQUESTS_CA_BUNDLE={garbage}" in str(info.value)


@pytest.mark.parametrize("trusted", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_requests_ca_bundle_wins_over_curl_ca_bundle(
    make_tls_auth: MakeAuth,
    ca: TestCA,
    stranger: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    trusted: str,
) -> None:
    """Both set, as requests reads them: REQUESTS_CA_BUNDLE is used and CURL_CA_BUNDLE is not."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, str(ca.bundle if variable == trusted else stranger.bundle))
    auth = make_tls_auth()
    if trusted == "REQUESTS_CA_BUNDLE":
        assert auth.get_token()
    else:
        with pytest.raises(TokenRequestError, match="not trusted"):
            auth.get_token()


# ---- verify=: what is refused, and pickling --------------------------------------------


@pytest.mark.parametrize(
    ("verify", "match"),
    [
        (False, "verify=False is refused"),
        (0, "verify must be True"),
        ("/no/such/bundle.pem", "names no CA bundle"),
        (b"/etc/ssl", "verify must be True"),
    ],
)
def test_verify_refused_at_construction(
    verify: Any, match: str, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """verify=False (the form carries the secret) and nonsense fail at construction."""
    with pytest.raises(EdrvAuthError, match=match) as info:
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, verify=verify)
    assert leak_watch.leaks(str(info.value)) == []
    assert fake.token_requests == 0


def test_context_that_does_not_verify_is_refused() -> None:
    """An SSLContext with verification or host-name checks off is refused like verify=False."""
    lax = ssl.create_default_context()
    lax.check_hostname = False
    with pytest.raises(EdrvAuthError, match="does not check certificates"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, verify=lax)
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(EdrvAuthError, match="does not check certificates"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, verify=lax)


def test_context_loosened_after_construction_is_refused_when_the_request_is_made(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    no_sleep: list[float],
) -> None:
    """A context that stops checking host names after construction is refused at the token
    request: nothing is sent, nothing retried, nothing counted."""
    context = ca.client_context()
    auth = make_tls_auth(verify=context)
    context.check_hostname = False
    with pytest.raises(TokenRequestError, match="no longer checks certificates") as info:
        auth.get_token()
    assert info.value.status_code is None
    assert (tls_fake.token_requests, no_sleep, _cap_record(auth)) == (0, [], ())


def test_construction_with_verify_sends_and_builds_nothing(
    ca: TestCA, tls_fake: FakeEdrv, clean_env: Path
) -> None:
    """Construction stays lazy: no request, no file, no SSL context built."""
    before = dict(edrv_auth._contexts)
    EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url=tls_fake.token_url, verify=str(ca.bundle))
    assert edrv_auth._contexts == before
    assert tls_fake.token_requests == 0
    assert not clean_env.exists()


def test_pickling_keeps_a_verify_path(
    make_tls_auth: MakeAuth, tls_fake: FakeEdrv, ca: TestCA, clean_env: Path
) -> None:
    """verify= a path pickles with the instance, and the copy trusts the same CA."""
    auth = make_tls_auth(verify=str(ca.bundle))
    copy = pickle.loads(pickle.dumps(auth))
    assert copy._describe().endpoint.verify == str(ca.bundle)
    copy.get_token()
    assert tls_fake.token_requests == 1


def test_pickling_with_a_verify_context_fails_clearly(make_tls_auth: MakeAuth, ca: TestCA) -> None:
    """An SSLContext cannot cross processes: pickling says so, not a raw TypeError."""
    auth = make_tls_auth(verify=ca.client_context())
    with pytest.raises(EdrvAuthError, match=r"verify= is an ssl\.SSLContext"):
        pickle.dumps(auth)


# ---- proxies ---------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])
@pytest.mark.usefixtures("ca_in_env")
def test_proxy_variable_routes_the_token_request_through_a_tunnel(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
    library: str,
    variable: str,
) -> None:
    """HTTPS_PROXY or ALL_PROXY: the token request and the API call both tunnel through it."""
    monkeypatch.setenv(variable, proxy.url)
    auth = make_tls_auth()
    auth.get_token()  # the token request alone: one tunnel
    authority = tls_fake.url.removeprefix("https://")
    assert proxy.tunnels == [authority]
    assert _api_call(library, auth, f"{tls_fake.url}/v1.1/x") == 200
    assert proxy.tunnels == [authority, authority]  # then the library's own
    assert (tls_fake.token_requests, tls_fake.api_requests) == (1, 1)


#: NO_PROXY as the token request reads it: (the token endpoint's host, NO_PROXY, whether
#: httpx then connects directly, whether requests does). The token request goes through
#: httpx, so it follows httpx where the two libraries differ (the README says so).
NO_PROXY_CASES = [
    ("localhost", "localhost", True, True),
    ("localhost", "LOCALHOST", True, True),
    ("localhost", "example.com, localhost", True, True),
    ("localhost", "localhost:{port}", True, True),
    ("localhost", "localhost:1", False, False),
    ("localhost", "*", True, True),
    ("localhost", "127.0.0.1", False, False),  # an address excludes that address, not a name
    ("127.0.0.1", "127.0.0.1", True, True),
    # Where they differ:
    ("localhost", ".localhost", False, True),  # httpx: subdomains only; requests: the domain too
    ("localhost", "example.com, *", True, False),  # requests honours "*" only as the whole value
    ("127.0.0.1", "127.0.0.0/8", False, True),  # httpx reads no networks, only addresses
]


@pytest.mark.parametrize(("host", "no_proxy", "httpx_direct", "requests_direct"), NO_PROXY_CASES)
@pytest.mark.usefixtures("ca_in_env")
def test_no_proxy_is_read_as_httpx_reads_it(
    tls_fake: FakeEdrv,
    proxy: ConnectProxy,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    no_proxy: str,
    httpx_direct: bool,
    requests_direct: bool,
) -> None:
    """The token request tunnels, or not, exactly as httpx's own request to the same URL."""
    url = tls_fake.url.replace("localhost", host)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=url.rpartition(":")[2]))
    auth = EdrvAuth(
        CLIENT_ID, CLIENT_SECRET, token_url=f"{url}/oauth/token", api_url=url, cache_dir=clean_env
    )
    direct = []
    for call in (
        auth.get_token,
        *(lambda lib=lib: _api_call(lib, auth, url + "/v1") for lib in LIBRARIES),
    ):
        tunnels = len(proxy.tunnels)
        call()
        direct.append(len(proxy.tunnels) == tunnels)
    assert direct == [httpx_direct, requests_direct, httpx_direct]
    assert tls_fake.token_requests == 1


def test_proxy_credentials_are_sent_to_the_proxy_only_and_never_shown(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    leak_watch: LeakWatch,
) -> None:
    """A proxy URL with a user and password sends Proxy-Authorization on CONNECT, never to the
    token endpoint through the tunnel; a wrong one is named a 407, and nothing shows them."""
    password = "test-proxy-password-canary-71f0"
    leak_watch.secrets.add(password)
    with ConnectProxy(credentials=f"test-user:{password}") as guarded:
        monkeypatch.setenv("HTTPS_PROXY", guarded.url)
        auth = make_tls_auth(verify=str(ca.bundle))
        assert auth.get_token()
        assert guarded.tunnels == [tls_fake.url.removeprefix("https://")]
        assert guarded.authorizations[0] is not None
        assert [h for h in tls_fake.token_headers[0] if h.startswith("proxy-")] == []
        monkeypatch.setenv("HTTPS_PROXY", guarded.url.replace(password, "test-wrong-password"))
        auth.clear()
        with pytest.raises(TokenRequestError) as info:
            auth.get_token()
    message = str(info.value)
    assert f"the proxy 127.0.0.1:{guarded.port} refused the tunnel" in message
    assert "HTTP 407 Proxy Authentication Required" in message
    assert "check the user name and password in HTTPS_PROXY" in message
    assert "test-user" not in message
    assert "test-wrong-password" not in message
    assert leak_watch.leaks(message, repr(auth)) == []


@pytest.mark.parametrize(
    ("status", "said", "attempts"),
    [
        (
            403,
            "refused the tunnel to {authority}: HTTP 403 Forbidden (add localhost to NO_PROXY",
            1,
        ),
        (407, "refused the tunnel to {authority}: HTTP 407 Proxy Authentication Required", 1),
        (502, "could not open a tunnel to {authority}: HTTP 502 Bad Gateway (the proxy's", 3),
    ],
)
def test_proxy_error_on_connect_is_named_the_proxys_and_retried_only_if_5xx(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list[float],
    status: int,
    said: str,
    attempts: int,
) -> None:
    """A proxy answering CONNECT with an error: its answer, not the endpoint's, and never
    counted (the form never left). A 4xx (its policy, its credentials) is final; a 5xx
    (it could not reach the endpoint) may pass, and is retried."""
    with ConnectProxy(refuse=status) as refusing:
        monkeypatch.setenv("HTTPS_PROXY", refusing.url)
        auth = make_tls_auth(verify=str(ca.bundle))
        with pytest.raises(TokenRequestError) as info:
            auth.get_token()
    authority = tls_fake.url.removeprefix("https://")
    assert str(info.value).startswith(f"the proxy 127.0.0.1:{refusing.port} ")
    assert said.format(authority=authority) in str(info.value)
    assert info.value.status_code is None  # the endpoint said nothing
    assert (refusing.connections, len(no_sleep)) == (attempts, attempts - 1)
    assert _cap_record(auth) == ()
    assert tls_fake.token_requests == 0


@pytest.mark.usefixtures("ca_in_env")
def test_https_proxy_is_used(
    make_tls_auth: MakeAuth, tls_fake: FakeEdrv, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https:// proxy: TLS to the proxy, then TLS to the endpoint inside the tunnel. httpx
    checks the proxy's certificate against certifi and the system's store, which
    SSL_CERT_FILE extends (set here by ``ca_in_env``)."""
    with ConnectProxy(tls=ca.server_context()) as secure:
        monkeypatch.setenv("HTTPS_PROXY", secure.url)
        assert make_tls_auth().get_token() in tls_fake.issued_tokens
    assert secure.tunnels == [tls_fake.url.removeprefix("https://")]


@pytest.mark.usefixtures("ca_in_env")
def test_socks_proxy_is_used(
    make_tls_auth: MakeAuth, tls_fake: FakeEdrv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socks5:// ALL_PROXY carries the token request (httpx[socks] installed)."""
    pytest.importorskip("socksio", reason="httpx's SOCKS support (pip install 'httpx[socks]')")
    with Socks5Proxy() as socks:
        monkeypatch.setenv("ALL_PROXY", socks.url)
        assert make_tls_auth().get_token() in tls_fake.issued_tokens
    assert socks.targets == [tls_fake.url.removeprefix("https://")]


def test_socks_proxy_without_httpx_socks_says_what_to_install(
    make_tls_auth: MakeAuth, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    """Without socksio, a socks5:// proxy fails at once, saying what to install, and never
    showing the proxy's password."""
    monkeypatch.setitem(sys.modules, "socksio", None)  # `import socksio` now fails
    monkeypatch.setenv("ALL_PROXY", "socks5://test-user:test-pw@127.0.0.1:1080")
    with pytest.raises(TokenRequestError, match=r"pip install 'httpx\[socks\]'") as info:
        make_tls_auth().get_token()
    assert "test-pw" not in str(info.value)
    assert no_sleep == []


def test_proxy_httpx_cannot_use_is_named_not_shown(
    make_tls_auth: MakeAuth, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    """A proxy URL of a scheme httpx does not speak fails at once, without showing it."""
    monkeypatch.setenv("HTTPS_PROXY", "ftp://test-user:test-pw@127.0.0.1:21")
    with pytest.raises(
        TokenRequestError, match="HTTPS_PROXY, HTTP_PROXY or ALL_PROXY cannot"
    ) as info:
        make_tls_auth().get_token()
    assert "test-pw" not in str(info.value)
    assert no_sleep == []


def test_plain_http_token_url_never_goes_through_a_proxy(
    fake: FakeEdrv, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An http:// (loopback) token URL is sent directly, whatever HTTP_PROXY or ALL_PROXY
    say: a proxy would get the client secret in clear."""
    with ConnectProxy() as relay:
        monkeypatch.setenv("HTTP_PROXY", relay.url)
        monkeypatch.setenv("ALL_PROXY", relay.url)
        auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url=fake.token_url, cache_dir=clean_env)
        assert auth.get_token() in fake.issued_tokens
    assert relay.connections == 0
    assert fake.token_requests == 1


def test_one_client_per_trust_and_proxy_configuration(
    make_tls_auth: MakeAuth, tls_fake: FakeEdrv, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token requests with the same trust and proxies share one httpx client; another proxy
    setting gets its own, and so does a NO_PROXY set later (the proxy is then left out)."""
    monkeypatch.setattr(edrv_auth, "_clients", {})
    auth = make_tls_auth(verify=str(ca.bundle))
    auth.get_token()
    auth.clear()
    auth.get_token()
    assert len(edrv_auth._clients) == 1
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        auth.clear()
        auth.get_token()
        assert len(proxy.tunnels) == 1
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        auth.clear()
        auth.get_token()
        assert len(proxy.tunnels) == 1
    assert len(edrv_auth._clients) == 3
    assert tls_fake.token_requests == 4


# ---- what goes on the wire: hosts, paths, answers ----------------------------------------


def _token_through_a_router(
    server: FakeEdrv, ca: TestCA, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> list[str]:
    """Get a token for ``url`` through a CONNECT proxy that routes every tunnel to ``server``
    (so that a test can ask for port 443, or for any name); the tunnels the proxy opened."""
    with ConnectProxy(route_to=_port(server)) as router:
        monkeypatch.setenv("HTTPS_PROXY", router.url)
        auth = EdrvAuth(
            CLIENT_ID, CLIENT_SECRET, token_url=url, cache_dir=cache_dir, verify=str(ca.bundle)
        )
        assert auth.get_token() in server.issued_tokens
    return router.tunnels


def test_https_token_request_names_its_host_without_the_default_port(
    ca: TestCA, tls_fake: FakeEdrv, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https://localhost/... sends ``Host: localhost``, not ``localhost:443``, which a strict
    virtual-host check answers with 421."""
    url = "https://localhost/oauth/token"
    assert _token_through_a_router(tls_fake, ca, clean_env, monkeypatch, url) == ["localhost:443"]
    assert tls_fake.token_headers[0]["host"] == "localhost"


def test_trailing_dot_host_is_reached_and_its_certificate_trusted(
    ca: TestCA, tls_fake: FakeEdrv, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https://localhost./... (an absolute DNS name) gets a token: the certificate names
    ``localhost``, without the dot."""
    url = "https://localhost./oauth/token"
    assert _token_through_a_router(tls_fake, ca, clean_env, monkeypatch, url) == ["localhost:443"]


def test_international_host_goes_into_connect_in_its_idna_form(
    ca: TestCA, clean_env: Path, monkeypatch: pytest.MonkeyPatch, leak_watch: LeakWatch
) -> None:
    """https://bücher.localhost/...: the tunnel and the certificate check use
    ``xn--bcher-kva.localhost``, and the token comes back."""
    server = FakeEdrv(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, tls=_tls(ca, "bücher.localhost")
    )
    with contextlib.contextmanager(serve_watched)(server, leak_watch):
        url = "https://bücher.localhost/oauth/token"
        tunnels = _token_through_a_router(server, ca, clean_env, monkeypatch, url)
    assert tunnels == ["xn--bcher-kva.localhost:443"]


def _tls(ca: TestCA, name: str, **validity: Any) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for ``name``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.ca.issue_cert(name, **validity).configure_cert(context)
    return context


@pytest.mark.parametrize(
    "url",
    [
        "https://auth..example.com/oauth/token",
        "https://auth.example.com/oauth/token ",
        " https://auth.example.com/oauth/token",
        "https://auth.example.com/oauth/token\n",
        "https://auth example.com/oauth/token",
        "https://auth\u200b.example.com/oauth/token",
        "https://auth.\u2603\u200d.com/oauth/token",
        "https://" + "a" * 64 + ".example.com/oauth/token",
    ],
    ids=[
        "empty-label",
        "trailing-space",
        "leading-space",
        "newline",
        "space-in-host",
        "zero-width",
        "idna-rejects",
        "label-too-long",
    ],
)
def test_token_url_no_client_could_send_is_refused_at_construction(
    url: str, leak_watch: LeakWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at once, in one line naming the setting and not echoing the URL; through the
    variable as through the argument."""
    for configure in ("argument", "variable"):
        options = {"token_url": url} if configure == "argument" else {}
        monkeypatch.setenv("EDRV_TOKEN_URL", url)
        with pytest.raises(EdrvAuthError) as info:
            EdrvAuth(CLIENT_ID, CLIENT_SECRET, **options)
        message = str(info.value)
        assert message.startswith("token_url")
        assert "example.com" not in message
        assert len(message.splitlines()) == 1


@pytest.mark.parametrize("path", ["/oauth/tökén", "/oauth/to ken"])
def test_token_url_path_with_non_ascii_or_a_space_is_sent_encoded(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], path: str
) -> None:
    """Such a path is sent percent-encoded, as httpx sends it: here the fake answers 404 to
    that path, and that is what the error says (once, not retried)."""
    with pytest.raises(TokenRequestError) as info:
        make_auth(token_url=fake.url + path).get_token()
    assert info.value.status_code == 404
    assert no_sleep == []


def test_gzip_answer_is_decoded(make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch) -> None:
    """A token answer with ``Content-Encoding: gzip`` (a gateway's doing) is decoded."""
    import gzip

    leak_watch.secrets.add("fake-token-gzipped")
    body = json.dumps({"access_token": "fake-token-gzipped", "expires_in": 3600}).encode()
    fake.queue_token_response(
        200, gzip.compress(body), {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert make_auth().get_token() == "fake-token-gzipped"


def test_early_hints_before_the_answer_are_skipped(
    make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """An interim ``103 Early Hints`` is not the answer: the ``200`` after it is."""
    leak_watch.secrets.add("fake-token-after-hints")
    body = b'{"access_token": "fake-token-after-hints", "expires_in": 3600}'
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with RawServer(answer) as server:
        assert make_auth(token_url=server.token_url).get_token() == "fake-token-after-hints"


def test_short_body_is_an_incomplete_answer(
    make_auth: MakeAuth, no_sleep: list[float], leak_watch: LeakWatch
) -> None:
    """An answer shorter than its Content-Length is incomplete: retried, then reported as such
    (the form was sent: each attempt counts)."""
    leak_watch.secrets.add("fake-token-cut")
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        b'{"access_token": "fake-token-cut"'
    )
    with RawServer(answer) as server:
        auth = make_auth(token_url=server.token_url)
        with pytest.raises(TokenRequestError, match="malformed or incomplete answer") as info:
            auth.get_token()
    assert info.value.status_code is None
    assert (server.connections, len(no_sleep), len(_cap_record(auth))) == (3, 2, 3)


# ---- the deadline ------------------------------------------------------------------------


_DRIP_CHILD = """
import json, sys, time
import edrv_auth
auth = edrv_auth.EdrvAuth("{client_id}", sys.argv[1], token_url=sys.argv[2],
                          cache_dir=sys.argv[3], timeout=2)
started = time.monotonic()
try:
    auth.get_token()
    outcome = "token"
except edrv_auth.EdrvAuthError as exc:
    outcome = str(exc)
print(json.dumps({{"outcome": outcome, "seconds": time.monotonic() - started}}), flush=True)
"""


def test_dripping_answer_ends_by_the_deadline_for_the_lock_holder_and_its_waiter(
    tmp_path: Path,
) -> None:
    """Endpoints dripping their headers, or their body: with timeout=2 the process holding
    the lock ends after 3 attempts (6 s plus backoff), and a second process waiting for that
    lock gets the same error at the same time, without a request of its own (not a lock
    timeout, and not a repeat of the failing request).

    Both drips run at once, each with its own holder, waiter and cache folder.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(ROOT)
    code = _DRIP_CHILD.format(client_id=CLIENT_ID)
    servers = {part: DripServer(part).start() for part in ("headers", "body")}

    def spawn(part: str) -> subprocess.Popen[str]:
        args = [CLIENT_SECRET, servers[part].token_url, str(tmp_path / part)]
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    results: dict[tuple[str, str], dict[str, Any]] = {}
    children: list[subprocess.Popen[str]] = []
    try:
        holders = {part: spawn(part) for part in servers}
        children += holders.values()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(s.connections for s in servers.values()):
            time.sleep(0.02)
        waiters = {part: spawn(part) for part in servers}  # wait for their holder's lock
        children += waiters.values()
        for role, group in (("holder", holders), ("waiter", waiters)):
            for part, child in group.items():
                out, err = child.communicate(timeout=45)
                assert child.returncode == 0, err
                results[part, role] = json.loads(out)
    finally:
        for child in children:  # a child still running here failed the deadline
            if child.poll() is None:
                child.kill()
            child.communicate()
        for server in servers.values():
            server.stop()
    for (part, role), result in sorted(results.items()):
        print(f"drip {part}: {role} {result['seconds']:.2f} s")
        assert "did not answer in time" in result["outcome"]
        assert "lock" not in result["outcome"]
    for part, server in servers.items():
        # 3 attempts of 2 s and two backoff sleeps (at most 0.5 s and 1 s).
        assert 5.5 < results[part, "holder"]["seconds"] < 9.0
        # The waiter started later, and ends with the holder.
        assert results[part, "waiter"]["seconds"] < results[part, "holder"]["seconds"]
        assert results[part, "waiter"]["outcome"] == results[part, "holder"]["outcome"]
        assert server.connections == 3


def test_slow_connect_through_a_dead_proxy_is_bounded(
    fake: FakeEdrv, clean_env: Path, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    """A proxy that accepts and then says nothing to CONNECT: each attempt ends by timeout."""

    class Silent(ConnectProxy):
        def _serve(self, conn: Any) -> None:
            self._stop.wait(30)

    silent = Silent().start()
    try:
        monkeypatch.setenv("HTTPS_PROXY", silent.url)
        auth = EdrvAuth(
            CLIENT_ID,
            CLIENT_SECRET,
            token_url="https://localhost:9/oauth/token",
            cache_dir=clean_env,
            timeout=0.5,
        )
        started = time.monotonic()
        with pytest.raises(TokenRequestError, match="timed out"):
            auth.get_token()
        elapsed = time.monotonic() - started
    finally:
        silent.stop()
    assert elapsed < 3 * 0.5 + 1.0
    assert len(no_sleep) == 2
    assert _cap_record(auth) == ()  # the proxy never forwarded anything


def test_silent_tls_handshake_is_bounded_and_not_counted(
    clean_env: Path, no_sleep: list[float]
) -> None:
    """An endpoint that accepts and never answers the TLS ClientHello: each attempt ends by
    timeout, and none counts towards the cap (the form was never sent)."""

    class Silent(ConnectProxy):
        def _serve(self, conn: Any) -> None:
            self._stop.wait(30)

    silent = Silent().start()
    try:
        auth = EdrvAuth(
            CLIENT_ID,
            CLIENT_SECRET,
            token_url=f"https://127.0.0.1:{silent.port}/oauth/token",
            cache_dir=clean_env,
            timeout=0.5,
        )
        started = time.monotonic()
        with pytest.raises(TokenRequestError, match=r"TLS handshake .* timed out"):
            auth.get_token()
        elapsed = time.monotonic() - started
    finally:
        silent.stop()
    assert elapsed < 3 * 0.5 + 1.0
    assert (silent.connections, len(no_sleep)) == (3, 2)
    assert _cap_record(auth) == ()


def test_debuglevel_set_by_the_user_never_prints_the_form(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """http.client.HTTPConnection.debuglevel = 1 (a global) does not print our request."""
    monkeypatch.setattr(http.client.HTTPConnection, "debuglevel", 1)
    assert make_auth().get_token() in fake.issued_tokens
    out, err = capsys.readouterr()
    assert CLIENT_SECRET not in out + err
    assert "client_secret" not in out + err


def _token_request_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edrv_auth-token-request"]


def test_timeout_bounds_the_whole_answer(make_auth: MakeAuth, no_sleep: list[float]) -> None:
    """A server dripping its answer cannot stretch one attempt past `timeout`, and the
    attempts it cut do not linger: their connections are shut down at the deadline."""
    with DripServer("body") as drip:
        auth = make_auth(token_url=drip.token_url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TokenRequestError, match="timed out"):
            auth.get_token()
        elapsed = time.monotonic() - started
        for worker in _token_request_workers():
            worker.join(1.0)  # still dripping, unless its socket was shut down
        assert _token_request_workers() == []
    assert elapsed < 4  # 3 attempts of ~0.5 s, not 3 x 200 s


def test_ctrl_c_during_an_attempt_ends_it(make_auth: MakeAuth) -> None:
    """Ctrl-C while the caller waits for an attempt (a notebook user giving up) ends the
    attempt too: its connection is shut down, not left dripping in its thread."""
    with DripServer("body") as drip:
        auth = make_auth(token_url=drip.token_url, timeout=20)
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                auth.get_token()
        finally:
            timer.cancel()
        for worker in _token_request_workers():
            worker.join(1.0)  # still dripping, unless its socket was shut down
        assert _token_request_workers() == []


def _resolving(
    monkeypatch: pytest.MonkeyPatch, host: str, lookup: Callable[..., list[Any]]
) -> None:
    """Answer name lookups of ``host`` with ``lookup`` (the system's resolver for others)."""
    real = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return lookup(name, *args, **kwargs) if name == host else real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_next_address_is_tried_when_the_first_does_not_answer(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list[float],
) -> None:
    """A host whose first address does not answer (IPv6 where it is broken) is reached
    through its next address, within one attempt's timeout."""
    listener, fillers = blackhole()
    dead = listener.getsockname()
    live = ("127.0.0.1", _port(tls_fake))

    def lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", where) for where in (dead, live)]

    _resolving(monkeypatch, "localhost", lookup)
    try:
        auth = make_tls_auth(verify=str(ca.bundle), timeout=3)
        started = time.monotonic()
        assert auth.get_token() in tls_fake.issued_tokens
        elapsed = time.monotonic() - started
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert 1.0 <= elapsed < 3  # a third of the timeout on the dead address, then the live one
    assert no_sleep == []


def test_stuck_name_lookup_is_abandoned_and_sends_nothing_later(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list[float],
) -> None:
    """A name lookup that hangs ends each attempt at its deadline ("could not reach", not
    counted); when the lookups finally return, the abandoned attempts send nothing."""
    release = threading.Event()
    real = socket.getaddrinfo

    def lookup(*args: Any, **kwargs: Any) -> list[Any]:
        release.wait(30)
        return real(*args, **kwargs)

    _resolving(monkeypatch, "localhost", lookup)
    auth = make_tls_auth(verify=str(ca.bundle), timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TokenRequestError, match="could not reach the token endpoint") as info:
            auth.get_token()
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert "timed out" in str(info.value)
    assert elapsed < 3 * 0.5 + 1.0
    assert (len(no_sleep), _cap_record(auth)) == (2, ())
    for worker in _token_request_workers():
        worker.join(10)
    assert tls_fake.token_requests == 0


def test_failure_while_sending_the_form_counts_towards_the_cap(
    clean_env: Path, no_sleep: list[float]
) -> None:
    """An attempt cut while the form is being written may have reached the endpoint: it counts
    towards the cap (a 32 MB audience overflows the socket buffers of an endpoint that reads
    nothing and keeps a small receive window, so that the deadline comes while sending)."""

    class Deaf(ConnectProxy):
        def __init__(self) -> None:
            super().__init__()
            # A fixed, small window: the kernel must not grow it to take the whole form.
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def _serve(self, conn: Any) -> None:
            self._stop.wait(30)

    with Deaf() as deaf:
        auth = EdrvAuth(
            CLIENT_ID,
            CLIENT_SECRET,
            token_url=f"http://127.0.0.1:{deaf.port}/oauth/token",
            audience="x" * (32 << 20),  # nothing to percent-encode: the form is built at once
            cache_dir=clean_env,
            timeout=0.5,
        )
        with pytest.raises(TokenRequestError, match=r"the token request to .* failed: timed out"):
            auth.get_token()
    assert len(no_sleep) == 2
    assert len(_cap_record(auth)) == 3


# ---- retries: Retry-After, the overall deadline, jitter ----------------------------------


@pytest.mark.parametrize("value", ["99999999999", "0000000000000000000060", "1" + "0" * 400])
def test_long_all_digit_retry_after_fails_at_once(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], value: str
) -> None:
    """Any all-digit Retry-After is seconds: one too long to wait fails now, not retried."""
    for _ in range(edrv_auth._MAX_ATTEMPTS):
        fake.queue_token_response(503, {"error": "temporarily_unavailable"}, {"Retry-After": value})
    with pytest.raises(TokenRequestError) as info:
        make_auth().get_token()
    assert info.value.status_code == 503
    assert (fake.token_requests, no_sleep) == (1, [])


def test_retry_after_waits_stop_at_the_overall_deadline(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float]
) -> None:
    """503s asking for 10 s each, timeout=10: a third attempt could end after 25 s (the
    lock's waiters give up at 30 s), so there is none."""
    for _ in range(edrv_auth._MAX_ATTEMPTS):
        fake.queue_token_response(503, {"error": "temporarily_unavailable"}, {"Retry-After": "10"})
    with pytest.raises(TokenRequestError) as info:
        make_auth(timeout=10).get_token()
    assert info.value.status_code == 503
    assert (fake.token_requests, no_sleep) == (2, [10.0])


def test_slow_attempts_stop_at_the_overall_deadline(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    test_clock: Clock,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each 503 taking 8 s (of a 10 s timeout): after two, a third could end past 25 s."""
    real_post = edrv_auth._post

    def slow_post(*args: Any) -> Any:
        answer = real_post(*args)
        test_clock.offset += 8.0
        return answer

    monkeypatch.setattr(edrv_auth, "_post", slow_post)
    for _ in range(edrv_auth._MAX_ATTEMPTS):
        fake.queue_token_response(503, {"error": "temporarily_unavailable"})
    started = test_clock.offset
    with pytest.raises(TokenRequestError) as info:
        make_auth(timeout=10).get_token()
    assert fake.token_requests == 2  # 8 s, a backoff, 8 s: a third would risk 26+ s
    seconds = test_clock.offset - started  # the real milliseconds come on top
    assert seconds < edrv_auth._FETCH_DEADLINE
    shown = re.search(r"\(2 attempts over ([\d.]+) s, each limited to 10 s\)", str(info.value))
    assert shown is not None, str(info.value)
    assert seconds - 0.05 <= float(shown.group(1)) < seconds + 1.0


def test_backoff_is_jittered() -> None:
    """Backoff delays are drawn, not fixed: many draws spread over their whole range."""
    draws = [edrv_auth._backoff(2, None) for _ in range(200)]
    assert len(set(draws)) > 190
    assert min(draws) < 0.6
    assert max(draws) > 0.9


def test_retries_of_two_clients_do_not_sleep_alike(
    make_auth: MakeAuth, fake: FakeEdrv, no_sleep: list[float], tmp_path: Path
) -> None:
    """Two clients failing alike sleep different times: no synchronised retry waves."""
    for i in range(2):
        for _ in range(edrv_auth._MAX_ATTEMPTS):
            fake.queue_token_response(503, {"error": "temporarily_unavailable"})
        with pytest.raises(TokenRequestError):
            make_auth(cache_dir=tmp_path / f"client-{i}").get_token()
    assert len(no_sleep) == 4
    assert no_sleep[:2] != no_sleep[2:]


def test_subject_hash_matches_openssl(ca: TestCA) -> None:
    """The tests' own c_rehash name for the CA is the one `openssl x509 -hash` gives."""
    import shutil

    from transport_helpers import subject_hash

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to compare with (the SSL_CERT_DIR tests still run)")
    expected = subprocess.run(
        [openssl, "x509", "-hash", "-noout", "-in", str(ca.bundle)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert subject_hash(ca.bundle.read_bytes()) == expected
