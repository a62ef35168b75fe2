"""Construction: arguments, environment variables, validation, repr, pickling."""

from __future__ import annotations

import logging
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import API_KEY, CLIENT_ID, CLIENT_SECRET, LeakWatch, MakeAuth
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError


def test_public_names() -> None:
    """The module exports exactly the three public names and a literal version."""
    assert edrv_auth.__all__ == ["EdrvAuth", "EdrvAuthError", "TokenRequestError"]
    assert issubclass(TokenRequestError, EdrvAuthError)
    assert issubclass(EdrvAuthError, Exception)
    assert isinstance(edrv_auth.__version__, str)


def test_help_speaks_to_users() -> None:
    """help(edrv_auth) shows the module docstring: usage, not the maintainers' map of the file's
    sections (no line of it lists two of the section banners)."""
    source = Path(edrv_auth.__file__).read_text(encoding="utf-8")
    sections = re.findall(r"^# ---- (.+?)[:(-]", source, flags=re.MULTILINE)
    assert len(sections) >= 8
    doc = edrv_auth.__doc__ or ""
    assert "EdrvAuth()" in doc
    for line in doc.splitlines():
        assert sum(section.strip() in line for section in sections) < 2, line


def test_is_an_auth_for_both_libraries() -> None:
    """One object is a requests AuthBase and an httpx Auth."""
    import httpx
    import requests.auth

    auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET)
    assert isinstance(auth, requests.auth.AuthBase)
    assert isinstance(auth, httpx.Auth)


def test_construction_is_lazy(clean_env: Path) -> None:
    """Constructing sends nothing and writes nothing, even with a cache folder given."""
    EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url="http://127.0.0.1:9/oauth/token")
    assert not clean_env.exists()


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no arguments, client credentials come from EDRV_CLIENT_ID/EDRV_CLIENT_SECRET."""
    monkeypatch.setenv("EDRV_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("EDRV_CLIENT_SECRET", CLIENT_SECRET)
    auth = EdrvAuth()
    view = auth._describe()
    assert view is not None  # client-credentials mode
    assert (view.endpoint.client_id, view.endpoint.client_secret) == (
        CLIENT_ID,
        edrv_auth._Secret(CLIENT_SECRET),
    )


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only EDRV_API_KEY set, the object is in API-key mode."""
    monkeypatch.setenv("EDRV_API_KEY", API_KEY)
    auth = EdrvAuth()
    assert auth._describe() is None  # API-key mode
    assert auth.get_token() == API_KEY


def test_explicit_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit client id overrides EDRV_CLIENT_ID; the secret still comes from the env."""
    monkeypatch.setenv("EDRV_CLIENT_ID", "test-env-client-id")
    monkeypatch.setenv("EDRV_CLIENT_SECRET", CLIENT_SECRET)
    auth = EdrvAuth("test-arg-client-id")
    view = auth._describe()
    assert view is not None
    assert (view.endpoint.client_id, view.endpoint.client_secret) == (
        "test-arg-client-id",
        edrv_auth._Secret(CLIENT_SECRET),
    )


def test_explicit_api_key_ignores_client_credentials_in_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Passing api_key= chooses API-key mode even when the env holds client credentials."""
    monkeypatch.setenv("EDRV_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("EDRV_CLIENT_SECRET", CLIENT_SECRET)
    auth = EdrvAuth(api_key=API_KEY)
    assert (auth._describe(), auth.get_token()) == (None, API_KEY)


def _urls(auth: EdrvAuth) -> tuple[str, str, str]:
    """(token URL, API URL, audience), as the token source sees them."""
    view = auth._describe()
    assert view is not None
    return view.token_url, view.api_url, view.endpoint.audience


def test_urls_from_environment_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """URL variables apply when the argument is left at its default; an argument wins."""
    monkeypatch.setenv("EDRV_TOKEN_URL", "http://127.0.0.1:1/oauth/token")
    monkeypatch.setenv("EDRV_API_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("EDRV_AUDIENCE", "https://audience.example")
    assert _urls(EdrvAuth(CLIENT_ID, CLIENT_SECRET)) == (
        "http://127.0.0.1:1/oauth/token",
        "http://127.0.0.1:2",
        "https://audience.example",
    )
    auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET, api_url="http://localhost:3")
    assert auth._describe().api_url == "http://localhost:3"


def test_defaults_are_edrv() -> None:
    """Without configuration the real eDRV endpoints are used."""
    assert _urls(EdrvAuth(CLIENT_ID, CLIENT_SECRET)) == (
        "https://auth.edrv.io/oauth/token",
        "https://api.edrv.io",
        "https://api.edrv.io",
    )


def test_cache_dir_argument_then_environment_then_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """cache_dir wins, then EDRV_AUTH_CACHE_DIR, then $XDG_CACHE_HOME/edrv_auth."""
    assert EdrvAuth(
        CLIENT_ID, CLIENT_SECRET, cache_dir=tmp_path / "a"
    )._describe().file_cache.directory == (tmp_path / "a")
    monkeypatch.setenv("EDRV_AUTH_CACHE_DIR", str(tmp_path / "b"))
    assert EdrvAuth(CLIENT_ID, CLIENT_SECRET)._describe().file_cache.directory == tmp_path / "b"
    monkeypatch.delenv("EDRV_AUTH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        EdrvAuth(CLIENT_ID, CLIENT_SECRET)._describe().file_cache.directory
        == tmp_path / "xdg" / "edrv_auth"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert EdrvAuth(CLIENT_ID, CLIENT_SECRET)._describe().file_cache.directory == (
        tmp_path / "home" / ".cache" / "edrv_auth"
    )


@pytest.mark.parametrize(
    ("kwargs", "env", "expected"),
    [
        ({}, {}, "EDRV_CLIENT_ID and EDRV_CLIENT_SECRET (or EDRV_API_KEY)"),
        ({"client_id": CLIENT_ID}, {}, "EDRV_CLIENT_SECRET is missing"),
        ({}, {"EDRV_CLIENT_SECRET": CLIENT_SECRET}, "EDRV_CLIENT_ID is missing"),
        (
            {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "api_key": API_KEY},
            {},
            "not both",
        ),
        ({}, {"EDRV_API_KEY": API_KEY, "EDRV_CLIENT_ID": CLIENT_ID}, "not both"),
        (
            {},
            {"EDRV_CLIENTID": CLIENT_ID, "EDRV_CLIENT_SECRET": CLIENT_SECRET},
            "EDRV_CLIENT_ID is missing (EDRV_CLIENTID is set: did you mean EDRV_CLIENT_ID?)",
        ),
        (
            {},
            {"EDRV_APIKEY": API_KEY},
            "or pass them to EdrvAuth() (EDRV_APIKEY is set: did you mean EDRV_API_KEY?)",
        ),
    ],
)
def test_missing_or_conflicting_credentials_are_named(
    monkeypatch: pytest.MonkeyPatch,
    leak_watch: LeakWatch,
    kwargs: dict[str, str],
    env: dict[str, str],
    expected: str,
) -> None:
    """Neither or both credential kinds raise EdrvAuthError naming the variables, no secret."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EdrvAuthError) as caught:
        EdrvAuth(**kwargs)
    assert expected in str(caught.value)
    assert leak_watch.leaks(str(caught.value), repr(caught.value)) == []


def test_an_api_key_passed_as_the_only_argument_is_named(leak_watch: LeakWatch) -> None:
    """`EdrvAuth(key)` says that an API key goes in api_key=, without echoing it."""
    with pytest.raises(EdrvAuthError) as caught:
        EdrvAuth(API_KEY)
    assert str(caught.value) == (
        "incomplete eDRV credentials: EDRV_CLIENT_SECRET is missing; if the one argument you "
        "passed is an API key, pass it as api_key=..."
    )
    assert leak_watch.leaks(str(caught.value), repr(caught.value)) == []


def test_a_client_id_with_its_secret_in_the_environment_is_no_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-argument form is right when the secret comes from EDRV_CLIENT_SECRET."""
    monkeypatch.setenv("EDRV_CLIENT_SECRET", CLIENT_SECRET)
    assert EdrvAuth(CLIENT_ID)._describe().client_id == CLIENT_ID


@pytest.fixture
def warnings_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Callable[[], list[str]]:
    """The edrv_auth warnings logged so far, in a process that has reported no variable yet."""
    monkeypatch.setattr(edrv_auth, "_reported_strays", set())
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("EDRV_TOKEN_URI", "EDRV_TOKEN_URL"),
        ("EDRV_CLIENT_SECRETS", "EDRV_CLIENT_SECRET"),
        ("EDRV_CACHE_DIR", "EDRV_AUTH_CACHE_DIR"),
        ("EDRV_REDIS_URL", "EDRV_AUTH_REDIS_URL"),
        ("edrv_api_url", "EDRV_API_URL"),
    ],
)
def test_a_misspelled_variable_is_reported_once_with_the_name_meant(
    monkeypatch: pytest.MonkeyPatch,
    warnings_logged: Callable[[], list[str]],
    leak_watch: LeakWatch,
    name: str,
    meant: str,
) -> None:
    """An EDRV_* variable edrv_auth does not read is named in one warning per process, with
    the closest real name, and never its value (it may be a secret)."""
    value = "test-misspelled-value-canary"
    leak_watch.secrets.add(value)
    monkeypatch.setenv(name, value)
    EdrvAuth(CLIENT_ID, CLIENT_SECRET)
    EdrvAuth(api_key=API_KEY)
    assert warnings_logged() == [f"{name} is not a variable edrv_auth reads; did you mean {meant}?"]


def test_an_unknown_variable_is_reported_without_a_far_fetched_guess(
    monkeypatch: pytest.MonkeyPatch, warnings_logged: Callable[[], list[str]]
) -> None:
    """A name close to none of ours gets the list of those edrv_auth reads, not a guess."""
    monkeypatch.setenv("EDRV_WEBHOOK_SECRET", "test-webhook-secret")
    EdrvAuth(CLIENT_ID, CLIENT_SECRET)
    (warning,) = warnings_logged()
    assert warning.startswith("EDRV_WEBHOOK_SECRET is not a variable edrv_auth reads (it reads ")
    assert "did you mean" not in warning
    assert set(re.findall(r"EDRV_\w+", warning)) == {
        "EDRV_WEBHOOK_SECRET",
        *edrv_auth._OUR_VARIABLES,
    }


def test_our_own_variables_raise_no_warning(
    monkeypatch: pytest.MonkeyPatch, warnings_logged: Callable[[], list[str]], fake: FakeEdrv
) -> None:
    """Every variable edrv_auth reads, all set at once, is silently used."""
    for name, value in fake.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EDRV_AUDIENCE", "https://api.edrv.io")
    monkeypatch.setenv("EDRV_AUTH_REDIS_URL", "")  # empty: unset, but a name we read
    monkeypatch.setenv("EDRV_API_KEY", "")
    assert EdrvAuth().get_token() in fake.issued_tokens
    assert warnings_logged() == []


@pytest.mark.parametrize(
    "url",
    ["http://api.edrv.io", "http://10.0.0.1:8080", "ftp://api.edrv.io", "api.edrv.io", ""],
)
def test_insecure_or_invalid_urls_are_refused(url: str) -> None:
    """http:// is refused unless the host is loopback; non-http URLs are refused."""
    with pytest.raises(EdrvAuthError, match="api_url"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, api_url=url or "not a url")
    with pytest.raises(EdrvAuthError, match="token_url"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url=url or "not a url")


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://localhost:81", "http://[::1]:9000", "https://x.example"],
)
def test_loopback_http_and_https_are_accepted(url: str) -> None:
    """Plain http is fine on a loopback host, https anywhere."""
    EdrvAuth(CLIENT_ID, CLIENT_SECRET, api_url=url, token_url=url + "/oauth/token")


def test_http_api_url_on_port_80_is_refused() -> None:
    """requests and httpx keep the token on an http->https redirect to the same host: refuse it."""
    with pytest.raises(EdrvAuthError, match="port other than 80"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, api_url="http://127.0.0.1")
    # The token endpoint follows no redirect at all, so port 80 is fine there.
    EdrvAuth(CLIENT_ID, CLIENT_SECRET, token_url="http://127.0.0.1/oauth/token")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"refresh_margin": -1}, "refresh_margin"),
        ({"timeout": 26}, "timeout"),
        ({"refresh_margin": float("nan")}, "refresh_margin"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": "10"}, "timeout"),
    ],
)
def test_bad_numbers_are_refused(kwargs: dict[str, object], match: str) -> None:
    """Negative or non-numeric margins and timeouts raise EdrvAuthError at construction."""
    with pytest.raises(EdrvAuthError, match=match):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, **kwargs)  # type: ignore[arg-type]


def test_repr_shows_configuration_but_no_secret(leak_watch: LeakWatch, clean_env: Path) -> None:
    """repr()/str() show the client id, API URL and cache folder, never the secret or the key."""
    auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET)
    assert repr(auth) == (
        f"EdrvAuth(client_id={CLIENT_ID!r}, api_url='https://api.edrv.io', "
        f"cache={str(clean_env)!r})"
    )
    assert str(auth) == repr(auth)
    keyed = EdrvAuth(api_key=API_KEY)
    assert "api_key='***'" in repr(keyed)
    assert leak_watch.leaks(repr(auth), str(auth), repr(keyed), str(keyed)) == []


def test_token_values_hide_the_token() -> None:
    """The internal token value never shows the token in its repr."""
    token = edrv_auth._Token(edrv_auth._Secret("test-token-value"), 0.0, 10.0, "read:x")
    assert "test-token-value" not in repr(token)
    fresh = edrv_auth._Published(token, 5.0)
    assert "test-token-value" not in repr(fresh)
    assert "test-token-value" not in f"{token.access_token} {token.access_token!r}"


def test_errors_pickle_with_their_attributes() -> None:
    """TokenRequestError survives pickling (a multiprocessing worker's error reaches its parent)."""
    error = TokenRequestError("token request failed: HTTP 401", 401, "access_denied")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.status_code, copy.error) == (
        TokenRequestError,
        "token request failed: HTTP 401",
        401,
        "access_denied",
    )
    plain = pickle.loads(pickle.dumps(EdrvAuthError("no eDRV credentials")))
    assert str(plain) == "no eDRV credentials"


def test_auth_pickles_without_runtime_state(clean_env: Path) -> None:
    """EdrvAuth pickles (locks dropped) and the copy is a working, independent object."""
    auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET, cache_dir=clean_env)
    lock = auth._describe().thread_lock  # the process state, with its locks, exists
    copy = pickle.loads(pickle.dumps(auth))
    assert copy._describe().thread_lock is not lock
    assert copy._describe().file_cache.path == auth._describe().file_cache.path
    assert copy._describe().published is None


def test_a_used_auth_pickles_without_its_token(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """After requests through requests and httpx, the pickle holds no token: the child
    reads the shared cache instead (and shares the parent's token through it)."""
    import httpx
    import requests

    auth = make_auth()
    assert requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200
    with httpx.Client(auth=auth) as client:
        assert client.get(f"{fake.url}/v1.1/x").status_code == 200
    (token,) = fake.issued_tokens
    data = pickle.dumps(auth)
    assert token.encode() not in data
    assert pickle.loads(data).get_token() == token
    assert fake.token_requests == 1


def test_redis_url_without_the_redis_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis is an optional extra: without it, construction names the extra to install."""
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now fails
    with pytest.raises(EdrvAuthError, match=r"redis package: pip install redis$"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, redis_url="redis://127.0.0.1:6379/0")


def test_redis_url_from_environment_and_its_password_stays_hidden(
    monkeypatch: pytest.MonkeyPatch, leak_watch: LeakWatch, clean_env: Path
) -> None:
    """EDRV_AUTH_REDIS_URL is used; the repr shows host, port and db (then the file cache it
    falls back to), never the password."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    password = "test-redis-password-canary"
    leak_watch.secrets.add(password)
    monkeypatch.setenv("EDRV_AUTH_REDIS_URL", f"redis://user:{password}@127.0.0.1:6390/2")
    auth = EdrvAuth(CLIENT_ID, CLIENT_SECRET)
    assert repr(auth).endswith(f"cache='redis://127.0.0.1:6390/2, then {clean_env}')")
    assert leak_watch.leaks(repr(auth), repr(auth._describe().stores)) == []


def test_redis_url_must_be_a_redis_url() -> None:
    """A URL that is not redis://, rediss:// or unix:// is refused at construction."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    with pytest.raises(EdrvAuthError, match="redis_url must be"):
        EdrvAuth(CLIENT_ID, CLIENT_SECRET, redis_url="http://127.0.0.1:6379")


def test_api_key_mode_ignores_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API key needs no shared cache, so a Redis URL is not even imported for it."""
    monkeypatch.setitem(sys.modules, "redis", None)
    auth = EdrvAuth(api_key=API_KEY, redis_url="redis://127.0.0.1:6379/0")
    assert auth.get_token() == API_KEY


def test_timeout_longer_than_the_lock_wait_is_refused() -> None:
    """A token request must end before other processes stop waiting for the lock: the
    message says the bounds in words, and why."""
    with pytest.raises(EdrvAuthError) as caught:
        EdrvAuth(CLIENT_ID, "test-secret", timeout=60)
    assert str(caught.value) == (
        "timeout must be more than 0 and at most 25 seconds, so that a token request ends "
        "before other processes stop waiting for the token cache lock (after 30 s)"
    )


def test_explicit_default_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passing the default URL explicitly is an explicit argument: the variable loses."""
    monkeypatch.setenv("EDRV_API_URL", "http://127.0.0.1:9")
    explicit = "".join(["https://", "api.edrv.io"])  # equal to the default, another object
    assert EdrvAuth(CLIENT_ID, "test-secret", api_url=explicit)._describe().api_url == explicit
    assert EdrvAuth(CLIENT_ID, "test-secret")._describe().api_url == "http://127.0.0.1:9"


def test_invalid_redis_port_is_refused_at_construction() -> None:
    """A redis_url redis-py cannot parse fails at construction, not at every request."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    with pytest.raises(EdrvAuthError, match="invalid port"):
        EdrvAuth(CLIENT_ID, "test-secret", redis_url="redis://127.0.0.1:notaport/0")
