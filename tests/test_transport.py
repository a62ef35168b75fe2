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

import http.client
import json
import os
import pickle
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
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
from transport_helpers import ConnectProxy, DripServer, TestCA

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


def _cap_record(auth: EdrvAuth) -> tuple[float, ...]:
    """The token requests counted towards the storm cap, in memory and in the file."""
    state = auth._describe().file_cache.read()
    return (*auth._describe().remembered.requests, *(state.requests if state else ()))


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


def test_hostname_mismatch_says_so(
    ca: TestCA, tmp_path: Path, clean_env: Path, no_sleep: list[float]
) -> None:
    """A certificate for another name: "not valid for localhost (hostname mismatch)"."""
    folder = tmp_path / "other-name"
    folder.mkdir()
    other = TestCA(folder, names=("auth.example",))
    server = FakeEdrv(tls=other.server_context()).start()
    try:
        auth = EdrvAuth(
            CLIENT_ID,
            CLIENT_SECRET,
            token_url=server.token_url,
            cache_dir=clean_env,
            verify=str(other.bundle),
        )
        with pytest.raises(TokenRequestError, match="hostname mismatch") as info:
            auth.get_token()
        assert "not valid for localhost" in str(info.value)
        assert server.token_requests == 0
    finally:
        server.stop()
    assert no_sleep == []
    assert _cap_record(auth) == ()


def test_bundle_that_does_not_exist_is_named(
    make_tls_auth: MakeAuth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable naming a missing bundle: the error names the variable and the path."""
    missing = tmp_path / "no-such-bundle.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(missing))
    with pytest.raises(TokenRequestError, match="cannot load the CA certificates") as info:
        make_tls_auth().get_token()
    assert f"REQUESTS_CA_BUNDLE={missing}" in str(info.value)


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


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("no_proxy", ["localhost", "*", ".localhost", "127.0.0.1"])
@pytest.mark.usefixtures("ca_in_env")
def test_no_proxy_naming_the_host_goes_direct(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
    library: str,
    no_proxy: str,
) -> None:
    """NO_PROXY naming the token endpoint's host: no tunnel, for us as for the library.

    An address excludes that address only, not the name "localhost": everyone tunnels. The
    libraries disagree on ".localhost" (requests ignores the dot, httpx reads "subdomains
    only"); the token request follows requests and curl.
    """
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    # requests honours "*" only as the whole value
    monkeypatch.setenv("NO_PROXY", no_proxy if no_proxy == "*" else f"example.com, {no_proxy}")
    auth = make_tls_auth()
    auth.get_token()
    tunnelled = no_proxy == "127.0.0.1"
    assert len(proxy.tunnels) == tunnelled
    assert _api_call(library, auth, f"{tls_fake.url}/v1.1/x") == 200
    library_tunnelled = tunnelled or (no_proxy == ".localhost" and library == "httpx")
    assert len(proxy.tunnels) == tunnelled + library_tunnelled
    assert tls_fake.token_requests == 1


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("", False),
        ("*", True),
        ("auth.edrv.io", True),
        ("AUTH.EDRV.IO", True),
        ("edrv.io", True),
        (".edrv.io", True),
        ("*.edrv.io", True),
        (".auth.edrv.io", True),
        ("v.io", False),
        ("dv.io", False),
        ("other.example, edrv.io:443", True),
        ("edrv.io:8443", False),
        ("10.0.0.0/8", False),
    ],
)
def test_no_proxy_matching(no_proxy: str, bypassed: bool) -> None:
    """NO_PROXY matches a domain and its subdomains, with an optional port, and '*'."""
    assert edrv_auth._no_proxy("auth.edrv.io", 443, no_proxy) is bypassed


def test_no_proxy_matches_addresses_and_networks() -> None:
    """NO_PROXY entries that are IP addresses or networks match addresses inside them."""
    assert edrv_auth._no_proxy("10.1.2.3", 443, "10.0.0.0/8")
    assert edrv_auth._no_proxy("::1", 443, "::1")
    assert edrv_auth._no_proxy("::1", 8443, "[::1]:8443")
    assert not edrv_auth._no_proxy("11.1.2.3", 443, "10.0.0.0/8")


def test_proxy_credentials_are_sent_and_never_shown(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    leak_watch: LeakWatch,
) -> None:
    """A proxy URL with a user and password sends Proxy-Authorization; nothing shows them."""
    password = "test-proxy-password-canary-71f0"
    leak_watch.secrets.add(password)
    with ConnectProxy(credentials=f"test-user:{password}") as guarded:
        monkeypatch.setenv("HTTPS_PROXY", guarded.url)
        auth = make_tls_auth(verify=str(ca.bundle))
        assert auth.get_token()
        assert guarded.tunnels == [tls_fake.url.removeprefix("https://")]
        assert guarded.authorizations[0] is not None
        monkeypatch.setenv("HTTPS_PROXY", guarded.url.replace(password, "test-wrong-password"))
        auth.clear()
        with pytest.raises(TokenRequestError) as info:
            auth.get_token()
    message = str(info.value)
    assert "refused the tunnel" in message
    assert "407" in message
    assert "test-user" not in message
    assert "test-wrong-password" not in message
    assert leak_watch.leaks(message, repr(auth)) == []


@pytest.mark.parametrize("status", [403, 407])
def test_proxy_refusing_the_tunnel_says_so_and_is_not_retried(
    make_tls_auth: MakeAuth,
    tls_fake: FakeEdrv,
    ca: TestCA,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list[float],
    status: int,
) -> None:
    """A proxy answering CONNECT with 403/407: "refused the tunnel", final and not counted."""
    with ConnectProxy(refuse=status) as refusing:
        monkeypatch.setenv("HTTPS_PROXY", refusing.url)
        auth = make_tls_auth(verify=str(ca.bundle))
        with pytest.raises(TokenRequestError) as info:
            auth.get_token()
    message = str(info.value)
    assert f"the proxy http://127.0.0.1:{refusing.port} refused the tunnel" in message
    assert f"HTTP {status}" in message
    assert "could not reach" not in message
    assert no_sleep == []
    assert _cap_record(auth) == ()
    assert tls_fake.token_requests == 0


def test_unsupported_proxy_scheme_is_named(
    make_tls_auth: MakeAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socks5:// ALL_PROXY fails clearly, naming what is supported (not a hang)."""
    monkeypatch.setenv("ALL_PROXY", "socks5://test-user:test-pw@127.0.0.1:1080")
    with pytest.raises(TokenRequestError, match="http:// proxies only") as info:
        make_tls_auth().get_token()
    assert "test-pw" not in str(info.value)


def test_plain_http_token_url_goes_through_http_proxy(
    fake: FakeEdrv, clean_env: Path, monkeypatch: pytest.MonkeyPatch, test_clock: Clock
) -> None:
    """An http:// (loopback) token URL goes through HTTP_PROXY as a forwarded request."""
    forwarded: list[str] = []

    class Forwarding(ConnectProxy):
        def _serve(self, conn: Any) -> None:
            from transport_helpers import _read_head

            head = _read_head(conn)
            forwarded.append(head.split(b" ", 2)[1].decode())
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    relay = Forwarding().start()
    try:
        monkeypatch.setenv("HTTP_PROXY", relay.url)
        auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url=fake.token_url, cache_dir=clean_env)
        test_clock.slept = []  # no backoff waits
        with pytest.raises(TokenRequestError, match="HTTP 503"):
            auth.get_token()
    finally:
        relay.stop()
    assert forwarded == [fake.token_url] * edrv_auth._MAX_ATTEMPTS
    assert fake.token_requests == 0


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


def test_timeout_bounds_the_whole_answer(make_auth: MakeAuth, no_sleep: list[float]) -> None:
    """A server dripping its answer cannot stretch one attempt past `timeout`."""
    with DripServer("body") as drip:
        auth = make_auth(token_url=drip.token_url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TokenRequestError, match="timed out"):
            auth.get_token()
    assert time.monotonic() - started < 4  # 3 attempts of ~0.5 s, not 3 x 200 s


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
    with pytest.raises(TokenRequestError):
        make_auth(timeout=10).get_token()
    assert fake.token_requests == 2  # 8 s, a backoff, 8 s: a third would risk 26+ s
    assert test_clock.offset - started < edrv_auth._FETCH_DEADLINE


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
