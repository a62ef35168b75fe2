"""`edrv-auth doctor`: the settings in effect, then each check of the way to eDRV.

Against the fake eDRV over real TLS (a throwaway CA), through the real loopback CONNECT
proxy, with real files and a real redis-server: each check passes on a healthy setup and
fails, naming the fix, when its part is broken. Every test runs the doctor through the
`doctor` fixture, which sweeps all it printed for secrets: the client secret, the API key,
the proxy's and Redis's passwords and every token the fake issued.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import API_KEY, CLIENT_SECRET, LeakWatch, _closed_port, run_python
from fake_edrv import PROXY_VARIABLES, FakeEdrv
from redis_server import RedisServer
from test_cli import MODULE_DIR
from test_transport import ca, ca_in_env, tls_fake  # noqa: F401 - fixtures used here
from transport_helpers import ConnectProxy, TestCA, blackhole

import edrv_auth

PROXY_PASSWORD = "test-proxy-password-canary-5e1f"
REDIS_PASSWORD = "test-redis-password-canary-0a7c"

#: A check line: PASS, FAIL or SKIP, the check's name, what it saw.
CHECK_LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\w+): (.*)$")


class Doctor:
    """Runs `doctor` in this process and keeps all it printed, for the secret sweep."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.printed: list[str] = []

    def __call__(self, *options: str) -> tuple[int, str]:
        """The exit status and the standard output of `doctor OPTIONS`."""
        code = edrv_auth.main(["doctor", *options])
        out, err = self.capsys.readouterr()
        self.printed += [out, err]
        return code, out


@pytest.fixture
def doctor(
    capsys: pytest.CaptureFixture[str], leak_watch: LeakWatch, request: pytest.FixtureRequest
) -> Iterator[Doctor]:
    """Run `doctor`; at the end, no secret and no issued token may be in what it printed."""
    run = Doctor(capsys)
    yield run
    for name in ("fake", "tls_fake"):
        if name in request.fixturenames:
            leak_watch.secrets.update(request.getfixturevalue(name).issued_tokens)
    leak_watch.secrets.update({PROXY_PASSWORD, REDIS_PASSWORD})
    assert run.printed
    assert leak_watch.leaks(*run.printed) == []


@pytest.fixture
def tls_env(tls_fake: FakeEdrv, monkeypatch: pytest.MonkeyPatch) -> FakeEdrv:  # noqa: F811
    """Point the EDRV_* variables at the TLS fake (whose CA is not trusted yet)."""
    for name, value in tls_fake.environment().items():
        monkeypatch.setenv(name, value)
    return tls_fake


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    """A CONNECT proxy that wants a user name and password."""
    with ConnectProxy(credentials=f"test-user:{PROXY_PASSWORD}") as server:
        yield server


def settings(out: str) -> dict[str, str]:
    """The `name: value` lines before the checks."""
    lines = [line.partition(": ") for line in out.splitlines() if not CHECK_LINE.match(line)]
    return {name: value for name, _, value in lines[:-1]}


def checks(out: str) -> dict[str, tuple[str, str]]:
    """Each check's result (PASS, FAIL or SKIP) and detail, by name."""
    lines = [CHECK_LINE.match(line) for line in out.splitlines()]
    return {m[2]: (m[1], m[3]) for m in lines if m}


def port_of(server: FakeEdrv) -> str:
    return server.url.rpartition(":")[2]


@pytest.mark.usefixtures("ca_in_env")
def test_a_healthy_setup_passes_every_check_without_sending_credentials(
    tls_env: FakeEdrv, doctor: Doctor, clean_env: Path
) -> None:
    """Everything in effect is shown with where it comes from; every check passes; nothing
    reaches the token endpoint as a token request, and nothing is written."""
    bundle = os.environ["REQUESTS_CA_BUNDLE"]  # the test CA's
    code, out = doctor()
    assert code == 0
    assert settings(out) == {
        "version": settings(out)["version"],
        "mode": "client credentials, from EDRV_CLIENT_ID and EDRV_CLIENT_SECRET (never shown)",
        "client id": "test-client-id (EDRV_CLIENT_ID)",
        "token url": f"{tls_env.token_url} (EDRV_TOKEN_URL)",
        "audience": "https://api.edrv.io (default)",
        "api url": f"{tls_env.url} (EDRV_API_URL)",
        "cache file": settings(out)["cache file"],
        "cache folder": "not there yet: created 0700 at the first token request",
        "redis": "not configured",
        "trusted CAs": f"REQUESTS_CA_BUNDLE={bundle}, SSL_CERT_FILE={bundle}",
        "proxy": "none: neither HTTPS_PROXY nor ALL_PROXY is set",
        "checks": f"of the token endpoint {tls_env.token_url}, each within 10 s; "
        "none sends credentials",
    }
    assert settings(out)["cache file"].startswith(f"{clean_env}{os.sep}")
    assert settings(out)["cache file"].endswith(".json (EDRV_AUTH_CACHE_DIR)")
    found = checks(out)
    assert {name: result for name, (result, _) in found.items()} == dict.fromkeys(
        ["cache", "name", "connect", "tls", "answer", "clock"], "PASS"
    )
    assert found["name"][1].startswith("localhost resolves to ")
    assert found["connect"][1] == f"a TCP connection to localhost:{port_of(tls_env)}"
    assert found["tls"][1] == (
        "the certificate of localhost is trusted, unexpired and valid for localhost"
    )
    assert found["answer"][1] == (
        "the token endpoint answered a request without credentials: HTTP 405 (any status will do)"
    )
    assert out.endswith("\nall checks passed\n")
    assert (tls_env.token_requests, tls_env.token_headers) == (0, [])
    assert not clean_env.exists()  # read only: not even the cache folder was created


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "behind-a-proxy"])
def test_an_untrusted_private_ca_fails_tls_naming_the_variables(
    tls_env: FakeEdrv,
    doctor: Doctor,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
    proxied: bool,
) -> None:
    """A certificate from a CA nobody trusts here fails the tls check, which says to set
    REQUESTS_CA_BUNDLE or SSL_CERT_FILE; the connection itself passed (through the proxy)."""
    if proxied:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    code, out = doctor()
    assert code == 1
    found = checks(out)
    result, detail = found["tls"]
    assert result == "FAIL"
    assert detail.startswith(f"the certificate of the token endpoint {tls_env.token_url} is not ")
    assert detail.endswith(
        "set REQUESTS_CA_BUNDLE or SSL_CERT_FILE to that CA's bundle, or pass verify= a CA "
        "bundle path or an ssl.SSLContext"
    )
    assert found["connect"][0] == "PASS"
    assert ("through the proxy" in found["connect"][1]) is proxied
    assert [found["answer"][0], found["clock"][0]] == ["SKIP", "SKIP"]
    assert out.endswith("\nfailed: tls\n")
    assert len(proxy.tunnels) == int(proxied)


@pytest.mark.usefixtures("ca_in_env")
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "ALL_PROXY", "https_proxy"])
def test_a_proxy_in_use_is_named_without_its_password_and_carries_the_checks(
    tls_env: FakeEdrv,
    doctor: Doctor,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """The proxy httpx picks is shown (not its password); the name is left to it; the
    connection goes through its tunnel, as the token request's would."""
    monkeypatch.setenv(variable, proxy.url)
    code, out = doctor()
    assert code == 0
    assert settings(out)["proxy"] == (
        f"http://127.0.0.1:{proxy.port} ({variable.upper()}, with a user name and password, "
        "not shown)"
    )
    found = checks(out)
    assert found["name"] == ("SKIP", "localhost is resolved by the proxy, not here")
    assert found["connect"] == (
        "PASS",
        f"a TCP connection to localhost:{port_of(tls_env)} through the proxy "
        f"127.0.0.1:{proxy.port}",
    )
    assert found["clock"][0] == "PASS"
    assert proxy.tunnels == [f"localhost:{port_of(tls_env)}"]
    assert tls_env.token_requests == 0


@pytest.mark.usefixtures("ca_in_env")
@pytest.mark.parametrize("no_proxy", ["localhost", "example.com,localhost:{port}", "*"])
def test_a_proxy_excluded_by_no_proxy_is_not_used(
    tls_env: FakeEdrv,
    doctor: Doctor,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
) -> None:
    """With the host in NO_PROXY, the doctor says so, resolves the name itself and connects
    directly, as httpx does."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port_of(tls_env)))
    code, out = doctor()
    assert code == 0
    assert settings(out)["proxy"] == "none: NO_PROXY excludes localhost"
    found = checks(out)
    assert found["name"][0] == "PASS"
    assert found["connect"] == ("PASS", f"a TCP connection to localhost:{port_of(tls_env)}")
    assert proxy.connections == 0


def test_a_plain_http_token_url_never_goes_through_a_proxy(
    fake_env: FakeEdrv, doctor: Doctor, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loopback http:// token URL is checked directly, whatever proxy is set, and says so."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    code, out = doctor()
    assert code == 0
    assert settings(out)["proxy"] == (
        "none: a plain http:// URL (loopback only) never goes through a proxy"
    )
    assert settings(out)["trusted CAs"] == "none: plain http://"
    assert checks(out)["tls"] == ("SKIP", "none: a plain http:// URL (loopback only)")
    assert proxy.connections == 0


@pytest.mark.parametrize("broken", ["ca-bundle", "proxy-url"])
def test_a_trust_or_proxy_setting_that_cannot_be_used_fails_its_check(
    tls_env: FakeEdrv,
    doctor: Doctor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    """A CA bundle that holds no certificate fails tls, a proxy URL httpx cannot use fails
    connect: each says what to fix, as the token request would, and nothing is sent."""
    if broken == "ca-bundle":
        (tmp_path / "not-a-ca.pem").write_text("not a certificate")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "not-a-ca.pem"))
        name, start = "tls", f"cannot load the CA certificates of SSL_CERT_FILE={tmp_path}"
    else:
        monkeypatch.setenv("HTTPS_PROXY", f"ftp://test-user:{PROXY_PASSWORD}@127.0.0.1:21")
        name, start = "connect", "the proxy named by HTTPS_PROXY, HTTP_PROXY or ALL_PROXY cannot"
    code, out = doctor()
    assert code == 1
    result, detail = checks(out)[name]
    assert (result, detail[: len(start)]) == ("FAIL", start)
    assert [result for _, (result, _) in checks(out).items()].count("FAIL") == 1
    assert tls_env.token_requests == 0


def test_an_unreachable_endpoint_fails_connect(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody listening: the name passes, the connection fails with the fix, and the checks
    after it are not made."""
    monkeypatch.setenv("EDRV_TOKEN_URL", f"http://127.0.0.1:{_closed_port()}/oauth/token")
    code, out = doctor()
    assert code == 1
    found = checks(out)
    assert found["name"] == ("PASS", "127.0.0.1 resolves to 127.0.0.1")
    result, detail = found["connect"]
    assert result == "FAIL"
    assert detail.startswith("could not reach the token endpoint http://127.0.0.1:")
    assert detail.endswith("(check the network, any proxy settings, and EDRV_TOKEN_URL)")
    assert found["answer"] == found["clock"] == ("SKIP", "not checked: another check failed")
    assert out.endswith("\nfailed: connect\n")


def test_a_name_that_does_not_resolve_fails_name(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host no resolver knows (`.invalid` never resolves) fails the name check, which points
    at EDRV_TOKEN_URL; nothing else is tried."""
    monkeypatch.setenv("EDRV_TOKEN_URL", "https://edrv-auth-test.invalid/oauth/token")
    code, out = doctor()
    assert code == 1
    found = checks(out)
    result, detail = found["name"]
    assert result == "FAIL"
    assert detail.startswith("edrv-auth-test.invalid does not resolve (")
    assert detail.endswith("): check EDRV_TOKEN_URL, and the DNS")
    assert {found[name][0] for name in ("connect", "tls", "answer", "clock")} == {"SKIP"}


def test_every_check_ends_within_timeout(clean_env: Path) -> None:
    """An endpoint whose connections hang fails `connect` by `timeout`, and no later."""
    listener, fillers = blackhole()
    try:
        auth = edrv_auth.EdrvAuth(
            "test-client-id",
            CLIENT_SECRET,
            token_url=f"https://127.0.0.1:{listener.getsockname()[1]}/oauth/token",
            timeout=0.6,
        )
        started = time.monotonic()
        report = edrv_auth._doctor(auth, fetch=False)
        elapsed = time.monotonic() - started
    finally:
        for sock in (listener, *fillers):
            sock.close()
    (connect,) = [check for check in report["checks"] if check["name"] == "connect"]
    assert connect["result"] == "fail"
    assert "timed out" in connect["detail"]
    assert report["failed"] == ["connect"]
    assert elapsed < 0.6 + 1.0


def _theirs(folder: Path) -> Path:
    """``folder``, made another user's."""
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    return folder


@pytest.mark.posix_only
@pytest.mark.parametrize("kind", ["a-file", "under-a-file", "another-users", "not-writable"])
def test_an_unusable_cache_folder_fails_cache(
    fake_env: FakeEdrv,
    doctor: Doctor,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """A cache folder that is a file, lies under one, is another user's, or cannot be created:
    the cache check fails, names the reason and the variable to change, and nothing changes."""
    folder = clean_env
    if kind == "a-file":
        folder.write_text("not a folder")
        reason = "not a folder"
    elif kind == "under-a-file":
        clean_env.write_text("not a folder")
        folder = clean_env / "cache"
        monkeypatch.setenv("EDRV_AUTH_CACHE_DIR", str(folder))
        reason = "Not a directory"
    elif kind == "another-users":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        _theirs(folder)
        reason = "the folder is owned by another user"
    else:  # fault injection: root may write anywhere, so the OS is told to say no
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode: path != clean_env.parent and real_access(path, mode)
        )
        reason = f"{clean_env.parent} is not writable here"
    before = os.lstat(clean_env).st_mode if clean_env.exists() else None
    code, out = doctor()
    assert code == 1
    found = checks(out)
    assert found["cache"] == (
        "FAIL",
        f"{folder} cannot hold the token cache ({reason}): each process keeps its own token; "
        "set EDRV_AUTH_CACHE_DIR to a folder of yours",
    )
    assert found["answer"][0] == "PASS"  # the other checks are made all the same
    assert (os.lstat(clean_env).st_mode if clean_env.exists() else None) == before


@pytest.mark.posix_only
def test_a_group_writable_cache_folder_passes_and_is_left_as_it_is(
    fake_env: FakeEdrv, doctor: Doctor, clean_env: Path
) -> None:
    """A folder of ours that others may write is usable (it is made private when used): the
    doctor shows its owner and mode, says so, and changes nothing."""
    clean_env.mkdir()
    os.chmod(clean_env, 0o770)  # noqa: S103 - the loose folder under test
    code, out = doctor()
    assert code == 0
    assert settings(out)["cache folder"] == f"owner uid {os.getuid()} (you), mode 0770"
    assert checks(out)["cache"] == ("PASS", "usable (made 0700 when used)")
    assert os.stat(clean_env).st_mode & 0o777 == 0o770


@pytest.mark.parametrize(
    ("offset", "side"), [(-45, "ahead of"), (45, "behind"), (-20, None), (20, None)]
)
def test_the_clock_is_checked_against_the_endpoints_date(
    fake_env: FakeEdrv, doctor: Doctor, offset: float, side: str | None
) -> None:
    """A Date header more than 30 s away fails the clock check, saying which way and the fix;
    a skew of 20 s passes."""
    fake_env.clock_offset = offset
    code, out = doctor()
    result, detail = checks(out)["clock"]
    if side is None:
        assert (code, result) == (0, "PASS")
        within = re.fullmatch(
            r"within (\d+) s of the token endpoint's Date header \(over 30 s fails\)", detail
        )
    else:
        assert (code, result) == (1, "FAIL")
        assert detail.endswith(
            "Date header: set it right (NTP); so far off, tokens shared across machines look "
            "expired too early or valid too long, and certificates not yet valid or expired"
        )
        within = re.match(rf"this machine's clock is (\d+) s {side} the token endpoint", detail)
    assert within is not None
    assert abs(offset) - 3 <= int(within[1]) <= abs(offset) + 1  # whole seconds, and the trip


def test_fetch_makes_one_counted_token_request_each_time(
    fake_env: FakeEdrv, doctor: Doctor
) -> None:
    """`--fetch` makes one token request, says that it counts towards the cap, and reports the
    lifetime and scope; with a valid token cached, it still makes one, replacing that token."""
    code, out = doctor("--fetch")
    assert code == 0
    assert settings(out)["checks"].endswith("each within 10 s; only --fetch sends credentials")
    assert checks(out)["fetch"] == (
        "PASS",
        "a new token, its token request counted towards the cap (1 of at most 5 in the last "
        "60 s); lifetime 86400 s, scope read:chargestations write:sessions",
    )
    assert fake_env.token_requests == 1
    first = edrv_auth.EdrvAuth().get_token()
    code, out = doctor("--fetch")
    assert (code, checks(out)["fetch"][0]) == (0, "PASS")
    assert "(2 of at most 5 in the last 60 s)" in checks(out)["fetch"][1]
    assert fake_env.token_requests == 2
    assert edrv_auth.EdrvAuth().get_token() not in (first, None)  # the new one, for everyone
    assert fake_env.token_requests == 2


def test_fetch_in_a_loop_stops_at_the_cap(fake_env: FakeEdrv, doctor: Doctor) -> None:
    """`--fetch` replaces a token that is not due: never a renewal (which the cap leaves out),
    so a loop of them makes 5 token requests a minute and then none."""
    for made in range(1, 6):
        code, out = doctor("--fetch")
        assert (code, checks(out)["fetch"][0]) == (0, "PASS")
        assert f"({made} of at most 5 in the last 60 s)" in checks(out)["fetch"][1]
    code, out = doctor("--fetch")
    result, detail = checks(out)["fetch"]
    assert (code, result) == (1, "FAIL")
    assert detail.startswith("not requesting a token: 5 token requests")
    assert fake_env.token_requests == 5


def test_fetch_that_fails_leaves_the_cached_token_in_use(
    fake_env: FakeEdrv, doctor: Doctor, no_sleep: list[float]
) -> None:
    """eDRV failing during `--fetch`: the check fails with its answer, and the valid token
    that was cached stays in use for every process (no renewal is forced on them)."""
    cached = edrv_auth.EdrvAuth().get_token()
    for _ in range(3):
        fake_env.queue_token_response(503, {"error": "temporarily_unavailable"})
    code, out = doctor("--fetch")
    result, detail = checks(out)["fetch"]
    assert (code, result) == (1, "FAIL")
    assert "HTTP 503 temporarily_unavailable" in detail
    assert fake_env.token_requests == 4
    assert edrv_auth.EdrvAuth().get_token() == cached
    assert fake_env.token_requests == 4


def test_fetch_past_the_cap_makes_no_request_and_says_when(
    fake_env: FakeEdrv, doctor: Doctor
) -> None:
    """Five token requests in the last minute already: `--fetch` sends none, and fails saying
    when the next one is allowed; the cached token stays in use."""
    auth = edrv_auth.EdrvAuth()
    cached = auth.get_token()
    now = edrv_auth._clock.time()
    record = auth._describe().file_cache.read()
    assert record is not None
    auth._describe().file_cache.write(record._replace(requests=(now - 10,) * 5))
    code, out = doctor("--fetch")
    result, detail = checks(out)["fetch"]
    assert (code, result) == (1, "FAIL")
    assert detail.startswith("not requesting a token: 5 token requests")
    assert re.search(r"the next request is allowed in (4[0-9]|50) s$", detail)
    assert fake_env.token_requests == 1
    assert edrv_auth.EdrvAuth().get_token() == cached


def test_fetch_with_a_wrong_secret_fails_with_the_endpoints_answer(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret eDRV refuses: the checks of the way pass, the fetch fails with the fix."""
    monkeypatch.setenv("EDRV_CLIENT_SECRET", "test-wrong-secret")
    code, out = doctor("--fetch")
    assert code == 1
    found = checks(out)
    result, detail = found["fetch"]
    assert result == "FAIL"
    assert "HTTP 401 access_denied" in detail
    assert "check EDRV_CLIENT_ID, EDRV_CLIENT_SECRET and the audience" in detail
    assert found["clock"][0] == "PASS"
    assert out.endswith("\nfailed: fetch\n")


def test_fetch_is_not_tried_when_the_way_is_broken(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token request is spent on an endpoint that the checks found unreachable."""
    monkeypatch.setenv("EDRV_TOKEN_URL", f"http://127.0.0.1:{_closed_port()}/oauth/token")
    code, out = doctor("--fetch")
    assert code == 1
    assert checks(out)["fetch"] == ("SKIP", "not checked: another check failed")
    assert edrv_auth.EdrvAuth()._describe().file_cache.read() is None  # nothing counted


@pytest.fixture
def key_env(fake: FakeEdrv, monkeypatch: pytest.MonkeyPatch) -> FakeEdrv:
    """API-key mode against the fake, which accepts the canary key."""
    fake.api_key = API_KEY
    monkeypatch.setenv("EDRV_API_KEY", API_KEY)
    monkeypatch.setenv("EDRV_API_URL", fake.url)
    return fake


@pytest.mark.parametrize("accepted", [True, False])
def test_api_key_mode_checks_the_api_and_fetch_sends_the_key_once(
    key_env: FakeEdrv, doctor: Doctor, accepted: bool
) -> None:
    """With an API key the checks go to the API; without --fetch nothing carries the key,
    with it one request does, and a 401 says that the key is refused."""
    if not accepted:
        key_env.api_key = "test-other-key"
    code, out = doctor()
    assert code == 0
    assert settings(out)["mode"] == "API key, from EDRV_API_KEY (never shown)"
    assert "cache file" not in settings(out)
    assert checks(out)["answer"] == (
        "PASS",
        "the API answered a request without credentials: HTTP 404 (any status will do)",
    )
    assert key_env.api_requests == 0
    code, out = doctor("--fetch")
    url = f"{key_env.url}/v1.1/chargestations?limit=1"
    said = f"the API answered HTTP {200 if accepted else 401} to GET {url} with the key"
    expected = ("PASS", said) if accepted else ("FAIL", f"{said}: it refuses the key; check ")
    assert (code, checks(out)["fetch"]) == (
        0 if accepted else 1,
        expected if accepted else ("FAIL", expected[1] + "EDRV_API_KEY"),
    )
    assert key_env.api_auth_headers == [f"Bearer {API_KEY}"]


def test_json_is_the_same_report_as_one_object(fake_env: FakeEdrv, doctor: Doctor) -> None:
    """`--json` prints one JSON object with the same settings and checks as the text."""
    text = doctor()[1]
    code, out = doctor("--json")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"settings", "checks", "failed"}
    assert report["failed"] == []
    assert list(report["settings"]) == list(settings(text))
    assert report["settings"]["token url"] == settings(text)["token url"]
    assert [(c["name"], c["result"].upper()) for c in report["checks"]] == [
        (name, result) for name, (result, _) in checks(text).items()
    ]


def test_a_failing_json_report_lists_the_failures(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing check is listed in `failed`, and the exit status is 1 with --json too."""
    monkeypatch.setenv("EDRV_TOKEN_URL", f"http://127.0.0.1:{_closed_port()}/oauth/token")
    code, out = doctor("--json")
    assert (code, json.loads(out)["failed"]) == (1, ["connect"])


def test_an_unreachable_redis_fails_without_showing_its_password(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis named but not answering: its label (no password) is shown, and its check fails."""
    pytest.importorskip("redis")
    port = _closed_port()
    monkeypatch.setenv("EDRV_AUTH_REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0")
    code, out = doctor()
    assert code == 1
    assert settings(out)["redis"] == f"redis://127.0.0.1:{port}/0 (EDRV_AUTH_REDIS_URL)"
    result, detail = checks(out)["redis"]
    assert result == "FAIL"
    assert detail == (
        f"redis://127.0.0.1:{port}/0 cannot be used (ConnectionError): each machine falls back "
        "on its file; check EDRV_AUTH_REDIS_URL and the server"
    )


@pytest.mark.needs_redis
def test_a_reachable_redis_passes(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running Redis answers the check."""
    pytest.importorskip("redis")
    with RedisServer() as server:
        monkeypatch.setenv("EDRV_AUTH_REDIS_URL", server.url)
        code, out = doctor()
    assert code == 0
    assert checks(out)["redis"] == ("PASS", f"{server.url} answers")


def test_the_command_line_runs_it(fake: FakeEdrv, leak_watch: LeakWatch) -> None:
    """`python -m edrv_auth doctor` works in a real process: exit 0 and the report on stdout;
    a configuration error is exit 2 and one line, as for the other commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDRV_")}
    ok = run_python("-m", "edrv_auth", "doctor", cwd=MODULE_DIR, env={**env, **fake.environment()})
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith(f"version: edrv_auth {edrv_auth.__version__}, Python ")
    assert ok.stdout.endswith("\nall checks passed\n")
    failed = run_python("-m", "edrv_auth", "doctor", cwd=MODULE_DIR, env=env)
    assert failed.returncode == 2
    assert failed.stderr.startswith("edrv_auth: no eDRV credentials")
    assert failed.stderr.count("\n") == 1
    assert leak_watch.leaks(ok.stdout, ok.stderr, failed.stdout, failed.stderr) == []


def test_help_says_what_it_checks_and_what_it_sends() -> None:
    """`doctor --help` says that the checks send no credentials, what --fetch costs, and --json."""
    result = run_python("-m", "edrv_auth", "doctor", "--help", cwd=MODULE_DIR)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "None of these sends the credentials" in text
    assert "counted towards the cap of 5 a minute" in text
    assert "--json" in text


# ---- the README's two outputs ------------------------------------------------------------

#: What the README shows in place of this run's ports, folder and versions.
README_PORTS = {"fake": "8443", "proxy": "3128"}
README_HOME = "/home/me"


def readme_session(home: Path, *, trusted: bool) -> str:
    """`python -m edrv_auth doctor` as the README shows it: the fake eDRV over TLS with a
    private CA's certificate, behind a proxy that wants a password, the cache in its default
    folder; the CA trusted or not. Its output, with the README's ports and home folder."""
    company = TestCA(home)
    (home / "ca.pem").rename(home / "company-ca.pem")
    fake = FakeEdrv(client_id="test-client-id", client_secret="test-client-secret")
    fake.tls = company.server_context()
    with fake, ConnectProxy(credentials="me:test-proxy-password") as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDRV_", "XDG_"))}
        for name in [*PROXY_VARIABLES, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_DIR"]:
            env.pop(name, None)
        env.update(fake.environment(), HOME=str(home), HTTPS_PROXY=proxy.url, SSL_CERT_FILE="")
        if trusted:  # the README's fix
            bundle = f"{home}/company-ca.pem"
            env.update(REQUESTS_CA_BUNDLE=bundle, SSL_CERT_FILE=bundle)
        result = run_python("-m", "edrv_auth", "doctor", cwd=MODULE_DIR, env=env)
        out = result.stdout.replace(str(home), README_HOME).replace(
            sys.prefix, f"{README_HOME}/.venv"
        )
        out = out.replace(f":{port_of(fake)}", f":{README_PORTS['fake']}")
        return out.replace(f":{proxy.port}", f":{README_PORTS['proxy']}")


def comparable(text: str) -> str:
    """``text`` without what changes from run to run: versions, a cache file's name (it
    digests the token URL), a certifi path, a clock's second."""
    for pattern, fixed in [
        (r"Python [\d.]+\w*, httpx [\d.]+", "Python X, httpx X"),
        (r"[0-9a-f]{32}\.json", "NAME.json"),
        (r"certifi /\S+", "certifi PATH"),
        (r"within \d+ s", "within N s"),
    ]:
        text = re.sub(pattern, fixed, text)
    return text


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-ca", "healthy"])
def test_the_readme_shows_real_outputs(tmp_path: Path, trusted: bool) -> None:
    """The README's two doctor outputs are what the doctor prints in their setup today."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## When it does not work") :]
    shown = re.findall(r"^```text\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    printed = readme_session(tmp_path, trusted=trusted)
    assert comparable(shown[int(trusted)]) == comparable(printed)
    assert "test-client-secret" not in printed
    assert "test-proxy-password" not in printed


def test_without_httpx_it_says_what_to_install(key_env: FakeEdrv) -> None:
    """API-key mode runs without httpx, but the doctor's checks need it: one line says so."""
    code = "import sys\nsys.modules['httpx'] = None\nimport edrv_auth\n"
    result = run_python("-c", code + "sys.exit(edrv_auth.main(['doctor']))", cwd=MODULE_DIR)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "edrv_auth: doctor's checks need httpx: pip install httpx\n"


def test_a_setting_cannot_add_lines_to_the_report(
    fake_env: FakeEdrv, doctor: Doctor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value with a line break and an escape code in it (a client id read from a file)
    shows on its own line, without them: the report stays one line per setting and check."""
    monkeypatch.setenv("EDRV_CLIENT_ID", "test-client-id\n\x1b[2JPASS  fake: all good")
    out = doctor()[1]
    shown = "test-client-id  [2JPASS  fake: all good (EDRV_CLIENT_ID)"
    assert settings(out)["client id"] == shown
    assert "fake" not in checks(out)
    assert "\x1b" not in out
