"""What a failed token request may show: no echo of the secret in any encoding, no userinfo.

An endpoint or a proxy that echoes the form can send the client secret back in many
spellings: URL-encoded with ``/`` kept or escaped, with lower-case escapes, base64 (alone or
as ``client_id:secret``, as a Basic header holds it), HTML entities, with zero-width
characters slipped in, or split between ``error`` and ``error_description``. Each test sends
one such echo and checks the message, ``.error``, and what an error reporter collects from
the frames of the raised error (``reporter_view``, from the leak sweep).
"""

from __future__ import annotations

import base64
import html
import urllib.parse
from pathlib import Path

import pytest
from conftest import CLIENT_ID, LeakWatch, MakeAuth
from fake_edrv import FakeEdrv
from test_leaks import reporter_view

import edrv_auth
from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError

#: A secret with characters that URL-encoding and HTML escape.
SECRET = "test-Secret/Canary+9=x"


def _every_spelling(secret: str) -> set[str]:
    """The spellings this file sends, for checking that none comes back."""
    quoted = urllib.parse.quote(secret, safe="")
    return {
        secret,
        quoted,
        quoted.lower(),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode(),
        html.escape(secret),
    }


def _failure(auth: EdrvAuth, leak_watch: LeakWatch, secret: str = SECRET) -> TokenRequestError:
    """get_token's error, checked: no spelling in its text or in any frame's locals."""
    leak_watch.secrets.add(secret)
    with pytest.raises(TokenRequestError) as info:
        auth.get_token()
    exc = info.value
    texts = [str(exc), repr(exc), str(exc.error)]
    texts += [text for _, text in reporter_view(exc)]
    for spelling in _every_spelling(secret):
        assert [t for t in texts if spelling in t] == [], spelling
    assert exc.__context__ is None
    assert exc.__cause__ is None
    return exc


ECHOES = {
    "plain": SECRET,
    "quote-slash-safe": urllib.parse.quote(SECRET),
    "quote-upper": urllib.parse.quote(SECRET, safe=""),
    "lowercase-escapes": urllib.parse.quote(SECRET, safe="").lower(),
    "quote_plus": urllib.parse.quote_plus(SECRET),
    "double-encoded": urllib.parse.quote(urllib.parse.quote(SECRET, safe=""), safe=""),
    "base64": base64.b64encode(SECRET.encode()).decode(),
    "base64-basic": base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode(),
    "base64-urlsafe-unpadded": base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("="),
    "html-named": html.escape(SECRET).replace("=", "&equals;").replace("/", "&sol;"),
    "html-numeric": "".join(f"&#{ord(ch)};" if not ch.isalnum() else ch for ch in SECRET),
    "zero-width": SECRET[:5] + "\u200b" + SECRET[5:12] + "\u2060" + SECRET[12:],
    "soft-hyphen": "\u00ad".join(SECRET),
    "upper-case": SECRET.upper(),
    "fullwidth": "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in SECRET),
    "fragment": SECRET[3:14],
}


@pytest.mark.parametrize("echo", list(ECHOES.values()), ids=list(ECHOES))
def test_error_description_echoing_the_secret_in_any_spelling_is_withheld(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, echo: str
) -> None:
    """Each spelling of the secret in error_description: masked where it is an exact copy of
    an encoding, else the whole description withheld; the code is still shown."""
    fake.queue_token_response(
        401, {"error": "invalid_client", "error_description": f"bad client_secret={echo} sent"}
    )
    exc = _failure(make_auth(client_secret=SECRET), leak_watch)
    assert (exc.status_code, exc.error) == (401, "invalid_client")
    assert "error_description withheld" in str(exc) or "client_secret=*** sent" in str(exc)
    assert echo not in str(exc)


def test_description_naming_the_secret_in_passing_is_masked_not_dropped(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """An exact copy is masked, so the rest of the description still helps the reader."""
    fake.queue_token_response(
        401, {"error": "invalid_client", "error_description": f"secret {SECRET} is revoked"}
    )
    exc = _failure(make_auth(client_secret=SECRET), leak_watch)
    assert "secret *** is revoked" in str(exc)


def test_secret_split_between_error_and_description_is_withheld(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """Halves shorter than 8 characters each, in error and error_description: neither shown."""
    secret = "test_split_Q7x"
    fake.queue_token_response(
        401, {"error": secret[:7], "error_description": secret[7:] + " rejected"}
    )
    exc = _failure(make_auth(client_secret=secret), leak_watch, secret)
    assert exc.error is None
    assert secret[:7] not in str(exc)
    assert secret[7:] not in str(exc)


@pytest.mark.parametrize(
    "error",
    [f"access_denied {SECRET}", "Access Denied", "x" * 100, "invalid-client", "<b>no</b>"],
)
def test_error_is_shown_only_when_it_is_a_plain_error_code(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, error: str
) -> None:
    """An `error` that is not shaped like an RFC 6749 code is neither shown nor kept."""
    fake.queue_token_response(400, {"error": error})
    exc = _failure(make_auth(client_secret=SECRET), leak_watch)
    assert exc.error is None
    assert error not in str(exc)


def test_error_code_that_is_a_piece_of_the_secret_is_not_shown(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """A code-shaped `error` that is the secret (a lower-case secret) is withheld too."""
    secret = "test_lowercase_secret"
    fake.queue_token_response(400, {"error": secret})
    exc = _failure(make_auth(client_secret=secret), leak_watch, secret)
    assert exc.error is None


@pytest.mark.parametrize("code", sorted(edrv_auth._OAUTH_ERRORS))
def test_rfc_error_codes_are_shown(
    make_auth: MakeAuth, fake: FakeEdrv, leak_watch: LeakWatch, code: str
) -> None:
    """Every RFC 6749/6750 error code is shown and kept as `.error`."""
    fake.queue_token_response(400, {"error": code, "error_description": "see the docs"})
    exc = _failure(make_auth(client_secret=SECRET), leak_watch)
    assert exc.error == code
    assert f"HTTP 400 {code}: see the docs" in str(exc)


def test_url_encoded_secret_never_reaches_a_message(
    fake: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """A proxy echoing the form (secret URL-encoded) does not put it in the error."""
    secret = "test/secret+canary=9"
    leak_watch.secrets.update({secret, "test%2Fsecret%2Bcanary%3D9"})
    fake.queue_token_response(
        400,
        {
            "error": "invalid_request",
            "error_description": "bad body: client_secret=test%2Fsecret%2Bcanary%3D9",
        },
    )
    with pytest.raises(TokenRequestError) as caught:
        make_auth(client_secret=secret).get_token()
    assert "client_secret=***" in str(caught.value)
    assert leak_watch.leaks(str(caught.value)) == []


# ---- URLs with a user name or password ---------------------------------------------------


@pytest.mark.parametrize("option", ["token_url", "audience", "api_url"])
@pytest.mark.parametrize(
    "url",
    [
        "https://test-user:test-url-password-canary@auth.example/oauth/token",
        "https://test-url-password-canary@auth.example/",
        "http://test-user:test-url-password-canary@127.0.0.1:8080/oauth/token",
        "https://test-user:test-url-password-canary@[::1:/x",  # not even a valid URL
    ],
)
def test_url_with_userinfo_is_refused_without_echo(
    option: str, url: str, leak_watch: LeakWatch
) -> None:
    """A user name or password in any of the three URLs is refused, and never shown."""
    leak_watch.secrets.update({"test-url-password-canary", "test-user"})
    with pytest.raises(EdrvAuthError, match=f"{option} must not contain a user name") as info:
        EdrvAuth(CLIENT_ID, SECRET, **{option: url})
    assert leak_watch.leaks(str(info.value), repr(info.value)) == []


@pytest.mark.parametrize("variable", ["EDRV_TOKEN_URL", "EDRV_AUDIENCE", "EDRV_API_URL"])
def test_url_with_userinfo_in_the_environment_is_refused_by_the_cli(
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    leak_watch: LeakWatch,
) -> None:
    """The same from the environment: `status` exits 2 with one line that does not echo it."""
    leak_watch.secrets.add("test-url-password-canary")
    monkeypatch.setenv("EDRV_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("EDRV_CLIENT_SECRET", SECRET)
    monkeypatch.setenv(variable, "https://test-user:test-url-password-canary@auth.example/x")
    assert edrv_auth.main(["status"]) == 2
    out, err = capsys.readouterr()
    assert "must not contain a user name or password" in err
    assert leak_watch.leaks(out, err) == []


@pytest.mark.parametrize("option", ["token_url", "api_url"])
@pytest.mark.parametrize(
    "url",
    [
        "test-user:test-url-password-canary@auth.example/oauth/token",  # no scheme
        "https:/test-user:test-url-password-canary@auth.example/oauth/token",  # one slash
    ],
)
def test_mistyped_url_is_refused_without_echo(option: str, url: str, leak_watch: LeakWatch) -> None:
    """A URL too broken to parse its user name is refused all the same, and never shown."""
    leak_watch.secrets.add("test-url-password-canary")
    with pytest.raises(EdrvAuthError, match=f"{option} is not a valid") as info:
        EdrvAuth(CLIENT_ID, SECRET, **{option: url})
    assert leak_watch.leaks(str(info.value), repr(info.value)) == []


# ---- credentials that cannot be sent --------------------------------------------------


def test_api_key_that_cannot_go_in_a_header_is_refused_without_echo(
    leak_watch: LeakWatch,
) -> None:
    """An API key read from a file with its newline is refused at construction, not shown
    later by requests or h11 in a header error."""
    key = "test-api-key-newline-canary\n"
    leak_watch.secrets.add(key.strip())
    with pytest.raises(EdrvAuthError, match="cannot go in a header") as info:
        EdrvAuth(api_key=key)
    assert leak_watch.leaks(str(info.value), repr(info.value)) == []
    assert [text for _, text in reporter_view(info.value) if key.strip() in text] == []


def test_secret_that_is_not_text_is_refused_without_echo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], leak_watch: LeakWatch
) -> None:
    """Environment bytes that are not UTF-8 make a secret that cannot be sent: one line
    from the CLI, the secret neither in it nor in any frame of the error."""
    secret = "test-surrogate-canary\udcff"
    leak_watch.secrets.add("test-surrogate-canary")
    with pytest.raises(EdrvAuthError, match="must be text") as info:
        EdrvAuth(CLIENT_ID, secret)
    assert [text for _, text in reporter_view(info.value) if "surrogate-canary" in text] == []
    monkeypatch.setenv("EDRV_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("EDRV_CLIENT_SECRET", secret)
    assert edrv_auth.main(["token"]) == 2
    out, err = capsys.readouterr()
    assert (out, err.count("\n")) == ("", 1)
    assert leak_watch.leaks(err) == []


def test_repr_of_an_instance_whose_construction_failed() -> None:
    """Error reporters call repr on the half-built instance in __init__'s frame: it works."""
    import traceback

    with pytest.raises(EdrvAuthError) as info:
        EdrvAuth(CLIENT_ID, SECRET, refresh_margin=-1)
    report = "".join(
        traceback.TracebackException.from_exception(info.value, capture_locals=True).format()
    )
    assert "EdrvAuth(<not configured>)" in report


# ---- transport failures: what the frames hold ------------------------------------------


def test_transport_failures_hold_nothing_secret_in_their_frames(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    leak_watch: LeakWatch,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Refused, timed out and proxied failures: no secret in any frame an error reporter reads."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    refused = make_auth(token_url=f"http://127.0.0.1:{closed}/oauth/token", client_secret=SECRET)
    assert "could not reach" in str(_failure(refused, leak_watch))
    fake.token_delay = 0.5
    slow = make_auth(timeout=0.2, client_secret=SECRET, cache_dir=tmp_path / "slow")
    assert "did not answer in time" in str(_failure(slow, leak_watch))
    fake.token_delay = 0.0
    password = urllib.parse.quote(SECRET, safe="")
    monkeypatch.setenv("HTTPS_PROXY", f"http://test-user:{password}@127.0.0.1:{closed}")
    proxied = make_auth(
        token_url="https://localhost:9/oauth/token",
        client_secret=SECRET,
        cache_dir=tmp_path / "proxied",
    )
    message = str(_failure(proxied, leak_watch))
    assert f"could not reach the proxy 127.0.0.1:{closed}" in message
    assert "test-user" not in message
