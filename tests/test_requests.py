"""The requests adapter against the loopback fake eDRV: every README guarantee."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import API_KEY, LeakWatch, MakeAuth, in_threads
from fake_edrv import FakeEdrv

from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture
def rejected_auth(fake: FakeEdrv, make_auth: MakeAuth) -> EdrvAuth:
    """An EdrvAuth holding a token the fake has since expired: its next call gets a 401."""
    auth = make_auth()
    auth.get_token()
    fake.expire_all()
    return auth


def test_first_request_fetches_one_token_and_sends_it(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """The first call makes one token request and sends `Authorization: Bearer <token>`."""
    auth = make_auth()
    response = requests.get(f"{fake.url}/v1.1/chargestations", auth=auth, timeout=5)
    assert response.status_code == 200
    assert fake.token_requests == 1
    assert fake.api_auth_headers == [f"Bearer {auth.get_token()}"]


def test_token_is_reused_from_memory_and_by_a_new_instance(
    fake: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """Later calls, and another instance sharing the cache, make no token request."""
    auth = make_auth()
    for _ in range(5):
        assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200
    assert session.get(f"{fake.url}/v1/x", auth=make_auth(), timeout=5).status_code == 200
    assert fake.counts() == {
        "token_requests": 1,
        "tokens_issued": 1,
        "api_requests": 6,
        "api_401s": 0,
    }


def test_session_auth_attribute_works(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """EdrvAuth set as `Session.auth` authenticates every request of the session."""
    with requests.Session() as s:
        s.auth = make_auth()
        assert s.get(f"{fake.url}/v1.1/x", timeout=5).status_code == 200
        assert s.post(f"{fake.url}/v1.1/x", json={"a": 1}, timeout=5).status_code == 200
    assert fake.token_requests == 1


def test_401_is_retried_once_with_a_new_token(
    fake: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """After server-side expiry, the request is re-sent once, with the 401 in history."""
    auth = make_auth()
    session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    old = auth.get_token()
    fake.expire_all()
    response = session.post(f"{fake.url}/v1.1/x", data=b"payload", auth=auth, timeout=5)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake.token_requests == 2
    assert fake.api_bodies[-2:] == [b"payload", b"payload"]
    assert fake.api_auth_headers[-2:] == [f"Bearer {old}", f"Bearer {auth.get_token()}"]
    assert auth.get_token() != old


def test_there_is_never_a_second_retry(
    fake: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """A 401 that a fresh token does not cure reaches the caller after exactly one resend."""
    auth = make_auth()
    fake.reject_all = True
    response = session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    assert response.status_code == 401
    assert len(response.history) == 1
    assert fake.api_requests == 2
    assert fake.token_requests == 2


def test_file_body_is_rewound_for_the_retry(
    fake: FakeEdrv, rejected_auth: EdrvAuth, session: requests.Session
) -> None:
    """A seekable body is replayed from where it started, not from where it ended."""
    auth = rejected_auth
    body = io.BytesIO(b"skip:the-real-body")
    body.seek(5)
    response = session.put(f"{fake.url}/v1.1/x", data=body, auth=auth, timeout=5)
    assert response.status_code == 200
    assert fake.api_bodies == [b"the-real-body", b"the-real-body"]


def test_generator_body_is_never_sent_twice(
    fake: FakeEdrv, rejected_auth: EdrvAuth, session: requests.Session
) -> None:
    """A body that cannot be replayed is sent once, and the caller gets the 401; the
    rejected token is still replaced, so the next request goes through at once."""
    auth = rejected_auth

    def chunks() -> Iterator[bytes]:
        yield b"one-"
        yield b"shot"

    response = session.post(f"{fake.url}/v1.1/x", data=chunks(), auth=auth, timeout=5)
    assert response.status_code == 401
    assert fake.api_bodies == [b"one-shot"]
    assert fake.token_requests == 2
    assert session.post(f"{fake.url}/v1.1/x", data=chunks(), auth=auth, timeout=5).ok
    assert (fake.api_requests, fake.token_requests) == (2, 2)


def test_body_that_tells_but_cannot_seek_gets_the_401(
    fake: FakeEdrv, rejected_auth: EdrvAuth, session: requests.Session
) -> None:
    """A stream with a position but no way back is sent once: the 401, not a seek error."""
    import io

    class Unseekable(io.BytesIO):
        def seekable(self) -> bool:
            return False

    body = Unseekable(b"one-shot")
    response = session.post(f"{fake.url}/v1.1/x", data=body, auth=rejected_auth, timeout=5)
    assert response.status_code == 401
    assert fake.api_bodies == [b"one-shot"]


def test_concurrent_401s_with_one_token_cause_one_token_request(
    fake: FakeEdrv, rejected_auth: EdrvAuth
) -> None:
    """16 threads rejected with the same token share one new token."""
    auth = rejected_auth
    fake.token_delay = 0.2  # keep the refresh in flight while the others arrive

    def call() -> int:
        with requests.Session() as s:
            return s.get(f"{fake.url}/v1.1/x", auth=auth, timeout=10).status_code

    statuses = in_threads(16, call)
    assert statuses == [200] * 16
    assert fake.token_requests == 2  # the first token, then one replacement


def test_replaced_token_is_reused_not_refetched(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """Compare-and-swap: a 401 for a token another instance already replaced fetches nothing."""
    first, second = make_auth(), make_auth()
    stale = first.get_token()
    assert second.get_token() == stale
    fake.expire_all()
    assert requests.get(f"{fake.url}/v1.1/x", auth=first, timeout=5).status_code == 200
    # `second` still holds the stale token in memory; its 401 must adopt first's new token.
    assert requests.get(f"{fake.url}/v1.1/x", auth=second, timeout=5).status_code == 200
    assert fake.token_requests == 2
    assert second.get_token() == first.get_token() != stale


def test_storm_cap_bounds_token_requests_when_401_persists(
    fake: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """A revoked client never turns API traffic into a stream of token requests."""
    auth = make_auth()
    fake.reject_all = True
    statuses = [
        session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code for _ in range(30)
    ]
    assert statuses == [401] * 30
    assert fake.token_requests == 5


def test_foreign_origin_is_refused_before_sending(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """A request to another origin raises EdrvAuthError and nothing reaches that host."""
    auth = make_auth()
    with pytest.raises(EdrvAuthError, match="refusing to send") as caught:
        requests.get(f"{other.url}/v1.1/x", auth=auth, timeout=5)
    assert other.api_requests == 0
    assert fake.token_requests == 0
    assert leak_watch.leaks(str(caught.value)) == []


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:{port}/v1.1/x",  # other scheme
        "http://localhost:{port}/v1.1/x",  # other host spelling: another origin
        "http://127.0.0.1.evil.example:{port}/v1.1/x",
        "http://127.0.0.1:{port}@evil.example/v1.1/x",
    ],
)
def test_lookalike_origins_are_refused(fake: FakeEdrv, make_auth: MakeAuth, url: str) -> None:
    """Only the exact scheme, host and port of api_url pass the origin check."""
    port = fake.url.rsplit(":", 1)[1]
    with pytest.raises(EdrvAuthError, match="refusing to send"):
        requests.get(url.format(port=port), auth=make_auth(), timeout=5)


def test_redirect_to_another_origin_never_carries_the_token(
    fake: FakeEdrv, other: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """Following a redirect elsewhere strips the token, and that host's 401 is not retried."""
    auth = make_auth()
    response = session.get(
        f"{fake.url}/redirect", params={"to": f"{other.url}/v1.1/x"}, auth=auth, timeout=5
    )
    assert response.status_code == 401  # the other host knows no token
    assert other.api_auth_headers == [None]
    assert fake.token_requests == 1


def test_same_origin_redirect_keeps_the_token(
    fake: FakeEdrv, make_auth: MakeAuth, session: requests.Session
) -> None:
    """A redirect within the API's origin keeps authenticating."""
    response = session.get(
        f"{fake.url}/redirect", params={"to": f"{fake.url}/v1.1/x"}, auth=make_auth(), timeout=5
    )
    assert response.status_code == 200
    assert fake.api_requests == 1


def test_api_key_mode_sends_the_key_and_never_requests_tokens(
    fake: FakeEdrv, clean_env: Path, leak_watch: LeakWatch, session: requests.Session
) -> None:
    """With api_key, every request carries it, with no token request, cache file or retry."""
    key = fake.issue_token()
    leak_watch.secrets.add(key)
    auth = EdrvAuth(api_key=key, api_url=fake.url, token_url=fake.token_url, cache_dir=clean_env)
    assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200
    fake.expire_all()
    response = session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    assert response.status_code == 401
    assert response.history == []
    assert fake.api_auth_headers == [f"Bearer {key}"] * 2
    assert fake.token_requests == 0
    assert not clean_env.exists()


def test_api_key_mode_still_pins_the_origin(fake: FakeEdrv, other: FakeEdrv) -> None:
    """The API key is a secret too: it is only sent to api_url's origin."""
    auth = EdrvAuth(api_key=API_KEY, api_url=fake.url)
    with pytest.raises(EdrvAuthError):
        requests.get(f"{other.url}/v1.1/x", auth=auth, timeout=5)
    assert other.api_requests == 0


def test_token_failure_on_retry_raises_and_frees_the_connection(
    fake: FakeEdrv, rejected_auth: EdrvAuth, session: requests.Session, no_sleep: list[float]
) -> None:
    """If the token endpoint fails during a retry, the caller gets TokenRequestError."""
    auth = rejected_auth
    fake.queue_token_response(401, {"error": "access_denied", "error_description": "Unauthorized"})
    with pytest.raises(TokenRequestError) as caught:
        session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    assert (caught.value.status_code, caught.value.error) == (401, "access_denied")
    # The connection was released: the session keeps working afterwards.
    assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 200


def test_callers_session_and_headers_are_untouched(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """The token request never uses or changes the caller's session."""
    with requests.Session() as s:
        s.headers["X-Custom"] = "kept"
        before = dict(s.headers)
        s.get(f"{fake.url}/v1.1/x", auth=make_auth(), timeout=5)
        assert dict(s.headers) == before
        assert s.auth is None
    assert "X-Custom" not in str(fake.token_forms)


@pytest.mark.parametrize("code", [302, 303])
def test_redirect_that_drops_the_body_then_401_is_retried(
    fake: FakeEdrv, rejected_auth: EdrvAuth, code: int
) -> None:
    """A file body POSTed into a 302/303 (which becomes a GET) then a 401: one clean retry."""
    auth = rejected_auth
    target = f"{fake.url}/v1.1/x"
    response = requests.post(
        f"{fake.url}/redirect",
        params={"to": target, "code": str(code)},
        data=io.BytesIO(b"payload"),
        auth=auth,
        timeout=5,
    )
    assert response.status_code == 200
    assert fake.token_requests == 2


def test_no_second_retry_after_a_redirect(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """401, retry, 302, then 401 again: the caller gets that 401; no second retry."""
    auth = make_auth()
    auth.get_token()
    fake.queue_api_response(401, {"ok": False, "message": "jwt expired", "result": None})
    fake.queue_api_response(302, "", {"Location": f"{fake.url}/v1.1/b"})
    fake.queue_api_response(401, {"ok": False, "message": "jwt expired", "result": None})
    fake.expire_all()
    response = requests.get(f"{fake.url}/v1.1/a", auth=auth, timeout=5)
    assert response.status_code == 401
    assert fake.api_requests == 3
    assert fake.token_requests == 2
    # The redirect carried the new token, not the one already rejected.
    assert fake.api_auth_headers[2] == f"Bearer {auth.get_token()}"


@pytest.mark.parametrize("body", [bytearray(b"payload"), memoryview(b"payload")])
def test_bytearray_and_memoryview_bodies_are_replayed(
    fake: FakeEdrv, rejected_auth: EdrvAuth, body: object
) -> None:
    """In-memory bodies of any bytes-like type are re-sent once after a 401."""
    auth = rejected_auth
    response = requests.post(f"{fake.url}/v1.1/x", data=body, auth=auth, timeout=5)
    assert response.status_code == 200
    assert fake.api_bodies == [b"payload", b"payload"]
