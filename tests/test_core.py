"""The token core's decisions: when to refresh, the storm cap's accounting, the shared state.

The clock is injected (`clock` fixture); no test sleeps to reach an expiry.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
import requests
from conftest import Clock, LeakWatch, MakeAuth, finish_renewal
from fake_edrv import FakeEdrv

import edrv_auth
from edrv_auth import TokenRequestError


def test_scheduled_renewals_are_not_capped(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Short-lived tokens are renewed as often as their lifetime needs, beyond 5 a minute."""
    fake.expires_in = 5
    auth = make_auth(refresh_margin=1)
    tokens = set()
    for _ in range(12):  # 12 renewals in 49 s
        tokens.add(auth.get_token())
        clock.advance(4.1)
    assert fake.token_requests == 12
    assert len(tokens) == 12


def test_a_401_after_many_renewals_still_gets_a_new_token(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Scheduled renewals do not use up the budget that an early server-side expiry needs."""
    fake.expires_in = 5
    auth = make_auth(refresh_margin=1)
    for _ in range(8):
        clock.advance(4.1)
        auth.get_token()
    fake.expire_all()
    response = requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]


def test_uncured_401_is_capped_at_5_including_the_first_token(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A revoked client: the first token plus 4 forced refreshes, then none for a minute."""
    auth = make_auth()
    fake.reject_all = True
    with requests.Session() as session:
        for _ in range(20):
            assert session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code == 401
        assert fake.token_requests == 5
        clock.advance(30)
        session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
        assert fake.token_requests == 5
        clock.advance(31)  # the first requests leave the window
        session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
        assert fake.token_requests == 6


def test_failures_are_capped_and_the_error_says_when_to_retry(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Failed token requests count: the 6th call in a minute is refused without a request."""
    for _ in range(6):
        fake.queue_token_response(400, {"error": "invalid_request"})
    auth = make_auth()
    for _ in range(5):
        with pytest.raises(TokenRequestError, match="HTTP 400"):
            auth.get_token()
    clock.advance(20)
    with pytest.raises(TokenRequestError, match=r"not requesting a token.*allowed in 40 s"):
        auth.get_token()
    assert fake.token_requests == 5


def test_a_wrong_secret_has_its_own_cap_and_never_locks_the_right_one_out(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Five tries with a mistyped secret use up its own cap, which `clear` does not lift (as
    the message says); the right secret, another credential set, gets its token at once."""
    wrong = make_auth(client_secret="test-wrong-secret")
    for _ in range(5):
        with pytest.raises(TokenRequestError, match="HTTP 401"):
            wrong.get_token()
    wrong.clear()
    clock.advance(15)
    with pytest.raises(TokenRequestError) as info:
        wrong.get_token()
    message = str(info.value)
    assert "the cap counts per credential set (client id and secret)" in message
    assert "clearing the cache does not lift it" in message
    assert message.endswith("the next request is allowed in 45 s")
    assert fake.token_requests == 5
    right = make_auth()
    assert right.get_token() in fake.issued_tokens
    assert fake.token_requests == 6
    assert right._describe().file_cache.path != wrong._describe().file_cache.path


def test_a_wrong_secret_is_never_served_the_token_cached_for_the_right_one(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """A process deployed with a wrong or rotated secret finds no token in the cache: its
    own token request fails, so the bad secret shows at once instead of a day later."""
    good = make_auth().get_token()
    with pytest.raises(TokenRequestError, match="HTTP 401"):
        make_auth(client_secret="test-rotated-secret").get_token()
    assert fake.token_requests == 2
    assert make_auth().get_token() == good  # the right one's entry is untouched
    assert fake.token_requests == 2


def test_retried_attempts_of_a_renewal_count_except_the_successful_one(
    fake: FakeEdrv, make_auth: MakeAuth, no_sleep: list[float], clock: Clock
) -> None:
    """A renewal that needed a retry records the failed attempt; the success is the renewal."""
    auth = make_auth()
    auth.get_token()  # into an empty cache: counted
    clock.advance(86400)
    fake.queue_token_response(503, "busy")
    auth.get_token()  # a renewal, after one failed attempt
    state = auth._describe().file_cache.read()
    assert state is not None
    assert fake.token_requests == 3
    # The first request left the window a day ago; the failed attempt is counted.
    assert len(state.requests) == 1
    assert state.renewed_at is not None
    assert state.requests[0] <= state.renewed_at


def test_first_token_counts_towards_the_cap(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """A fetch into an empty cache is counted, a renewal of an expired token is not."""
    auth = make_auth()
    auth.get_token()
    state = auth._describe().file_cache.read()
    assert state is not None
    assert (len(state.requests), state.renewed_at) == (1, None)


def test_clear_keeps_the_cap_record(fake: FakeEdrv, make_auth: MakeAuth, clock: Clock) -> None:
    """clear() in a loop cannot be used to get round the cap: fetches into an empty cache count."""
    fake.reject_all = True
    auth = make_auth()
    refused = 0
    with requests.Session() as session:
        for _ in range(10):
            try:
                session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
            except TokenRequestError:
                refused += 1
            auth.clear()
    assert fake.token_requests == 5
    assert refused == 7
    data = json.loads(auth._describe().file_cache.path.read_bytes())
    assert data["token"] is None
    assert len(data["token_requests"]) + (data["renewed_at"] is not None) == 5


def test_cap_is_shared_through_the_cache_file(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Two instances sharing the cache share one budget."""
    fake.reject_all = True
    first, second = make_auth(), make_auth()
    with requests.Session() as session:
        for _ in range(5):
            session.get(f"{fake.url}/v1.1/x", auth=first, timeout=5)
            session.get(f"{fake.url}/v1.1/x", auth=second, timeout=5)
    assert fake.token_requests == 5


def test_state_record_is_bounded(fake: FakeEdrv, make_auth: MakeAuth, clock: Clock) -> None:
    """The cache file never grows: it keeps at most the last few request times."""
    state = edrv_auth._CacheRecord()
    for i in range(100):
        state = state.after_request(None, None, [clock.now + i], clock.now + i)
    assert len(state.requests) == edrv_auth._MAX_TOKEN_REQUESTS


def test_reading_the_shared_cache_is_logged(
    fake: FakeEdrv, make_auth: MakeAuth, leak_watch: LeakWatch
) -> None:
    """The DEBUG log says when a token comes from the shared cache (and never shows it)."""
    make_auth().get_token()
    leak_watch.messages.clear()
    make_auth().get_token()
    assert any("using the token in the shared cache" in m for m in leak_watch.messages)


def test_request_times_slightly_in_the_future_still_count(clock: Clock) -> None:
    """Another machine's clock running ahead does not hide its token requests from the cap."""
    state = edrv_auth._CacheRecord(None, (clock.now + 10, clock.now + 20), None)
    assert len(state.counted_times(clock.now)) == 2


def test_clear_during_a_token_request_leaves_memory_and_disk_agreeing(
    fake: FakeEdrv, make_auth: MakeAuth
) -> None:
    """clear() waits for an in-flight token request, then forgets it everywhere."""
    fake.token_delay = 0.6
    auth = make_auth()
    fetcher = threading.Thread(target=auth.get_token)
    fetcher.start()
    while fake.token_requests == 0:
        time.sleep(0.01)
    auth.clear()
    fetcher.join()
    state = auth._describe().file_cache.read()
    assert auth._describe().published is None
    assert state is None or state.token is None


# ---- bogus lifetimes, and renewals that fail ----------------------------------


def test_millisecond_lifetime_does_not_turn_calls_into_token_requests(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A token said to live 1 ms is used on: 30 API calls cause at most 5 token requests."""
    for _ in range(30):  # the token itself stays valid: only its stated lifetime is bogus
        body = {"access_token": fake.issue_token(3600), "expires_in": 0.001}
        fake.queue_token_response(200, body)
    auth = make_auth()
    statuses = []
    with requests.Session() as session:
        for _ in range(30):
            statuses.append(session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code)
            clock.advance(0.01)  # each call sees its token "expired" by then
    assert statuses == [200] * 30
    assert fake.token_requests <= 5


def test_millisecond_token_that_really_dies_is_capped(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A token that really dies after 1 ms: 30 calls, at most 5 token requests, whatever happens."""
    fake.expires_in = 0.001
    auth = make_auth()
    outcomes: set[object] = set()
    with requests.Session() as session:
        for _ in range(30):
            try:
                outcomes.add(session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code)
            except TokenRequestError as exc:  # the cap speaks, and nothing else may
                outcomes.add("capped" if "not requesting a token" in str(exc) else str(exc))
            clock.advance(0.01)
    assert fake.token_requests <= 5
    assert outcomes <= {200, 401, "capped"}


def test_failed_renewal_keeps_the_current_token_and_retries_later(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal failing with most of the token's life left: same token, one WARNING, no storm."""
    auth = make_auth()
    first = auth.get_token()
    clock.advance(fake.expires_in - 250)  # past refresh_at (margin 300 s), 250 s before expiry
    for _ in range(3):
        fake.queue_token_response(503, {"error": "temporarily_unavailable"})
    with requests.Session() as session:
        for _ in range(10):  # one renewal attempt, in the background; the token is kept
            response = session.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
            assert response.status_code == 200
        finish_renewal(auth)
        assert fake.api_auth_headers == [f"Bearer {first}"] * 10
        assert fake.token_requests == 2
        clock.advance(edrv_auth._RENEW_RETRY - 1)
        assert auth.get_token() == first
        assert fake.token_requests == 2
        clock.advance(1)  # the next try, which fails too: still the same token
        assert [auth.get_token() for _ in range(5)] == [first] * 5
        finish_renewal(auth)
        assert fake.token_requests == 3
        clock.advance(edrv_auth._RENEW_RETRY)
        assert auth.get_token() == first  # the third failure
        finish_renewal(auth)
        assert make_auth().get_token() == first  # another process, too, from the cache
        assert fake.token_requests == 4
        clock.advance(edrv_auth._RENEW_RETRY)
        assert auth.get_token() == first  # eDRV is back: renewed in the background
        finish_renewal(auth)
        second = auth.get_token()
        assert second != first
        assert fake.token_requests == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not renew the token" in warnings[0].getMessage()


def test_failed_renewal_after_expiry_raises(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock, no_sleep: list[float]
) -> None:
    """Once the kept token has expired, a renewal that fails raises: no expired token is sent."""
    auth = make_auth()
    auth.get_token()
    clock.advance(fake.expires_in - 10)
    fake.queue_token_response(503, "busy")
    auth.get_token()  # kept: 10 s left
    clock.advance(10)
    for _ in range(3):
        fake.queue_token_response(503, "busy")
    with pytest.raises(TokenRequestError, match="HTTP 503"):
        auth.get_token()
    assert fake.token_requests == 5  # the first, one kept-renewal attempt, three retried ones


def test_a_due_token_past_the_cap_is_served_from_memory_until_the_cap_allows(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due for renewal with the cap full: kept, and not looked up under the lock on every call."""
    auth = make_auth()
    token = fake.issue_token()
    now = clock.now
    due = edrv_auth._Token(edrv_auth._Secret(token), now - 3500, now + 100)  # refresh_at passed
    auth._describe().file_cache.write(edrv_auth._CacheRecord(due, (now - 50,) * 5))
    locked = []
    real_locked = auth._describe().file_cache.locked
    monkeypatch.setattr(
        auth._describe().file_cache,
        "locked",
        lambda deadline: locked.append(1) or real_locked(deadline),
    )
    assert [auth.get_token() for _ in range(10)] == [token] * 10
    finish_renewal(auth)  # it found the cap full
    assert [auth.get_token() for _ in range(10)] == [token] * 10
    assert (fake.token_requests, len(locked)) == (0, 1)
    clock.advance(10)  # the cap allows one now: the renewal happens
    assert auth.get_token() == token
    finish_renewal(auth)
    assert auth.get_token() != token
    assert fake.token_requests == 1


def test_lifetime_equal_to_margin_is_not_stale_at_birth(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A token living exactly refresh_margin seconds is used for half its life, not refetched."""
    fake.expires_in = 300
    auth = make_auth(refresh_margin=300)
    tokens = {auth.get_token() for _ in range(20)}
    assert (len(tokens), fake.token_requests) == (1, 1)
    clock.advance(151)
    auth.get_token()
    finish_renewal(auth)
    assert fake.token_requests == 2


# ---- records and the cap, at their edges ------------------------------------------------


def _plant_record(auth: edrv_auth.EdrvAuth, record: edrv_auth._CacheRecord) -> None:
    auth._describe().file_cache.write(record)


def _token(fake: FakeEdrv, obtained_at: float, expires_at: float) -> edrv_auth._Token:
    """A token the fake accepts for an hour, whatever the record says of its lifetime."""
    return edrv_auth._Token(edrv_auth._Secret(fake.issue_token(3600)), obtained_at, expires_at)


def test_a_retry_time_after_expiry_never_serves_the_token_past_it(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """After a failed renewal, the next try may be set past the token's expiry: the token is
    still not served once it has expired."""
    auth = make_auth()
    now = clock.now
    token = _token(fake, now - 3590, now + 10)
    _plant_record(auth, edrv_auth._CacheRecord(token, renew_after=now + 20))
    assert auth.get_token() == token.access_token.value  # kept until the retry...
    clock.advance(10)  # ...but not past its expiry
    assert auth.get_token() != token.access_token.value
    assert make_auth().get_token() != token.access_token.value
    assert fake.token_requests == 1


def test_a_failed_renewal_after_a_401_drops_the_rejected_token_from_the_shared_record(
    fake: FakeEdrv, make_auth: MakeAuth, no_sleep: list[float]
) -> None:
    """The API refused the token and no new one came: other processes must not adopt it."""
    auth = make_auth()
    rejected = auth.get_token()
    fake.expire_all()
    for _ in range(3):
        fake.queue_token_response(503, "busy")
    with pytest.raises(TokenRequestError, match="HTTP 503"):
        requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    record = auth._describe().file_cache.read()
    assert record is not None
    assert record.token is None
    assert record.failure is not None
    assert make_auth().get_token() != rejected  # another process, arriving later, gets its own


def test_past_the_cap_an_expired_token_is_never_sent(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Cap reached and the cached token expired: the caller gets the cap's error, and the API
    never sees the expired token."""
    auth = make_auth()
    now = clock.now
    expired = _token(fake, now - 3600, now - 1)
    _plant_record(auth, edrv_auth._CacheRecord(expired, (now - 10,) * 5))
    with pytest.raises(TokenRequestError, match="not requesting a token"):
        requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5)
    assert (fake.api_requests, fake.token_requests) == (0, 0)


def test_past_the_cap_a_token_kept_in_memory_is_not_sent_after_it_expires(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Cap reached with a due token 5 s from expiry: it is served from memory, but only until
    it expires, even though the cap allows the next request later than that."""
    auth = make_auth(timeout=10)
    now = clock.now
    due = _token(fake, now - 3595, now + 5)
    _plant_record(auth, edrv_auth._CacheRecord(due, (now - 10,) * 5))  # allowed in 50 s
    assert auth.get_token() == due.access_token.value
    clock.advance(6)
    with pytest.raises(TokenRequestError, match="not requesting a token"):
        auth.get_token()
    assert fake.token_requests == 0


def test_a_retry_time_a_day_away_is_not_trusted(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A record whose next renewal try lies a day ahead (we never set one beyond 30 s): the
    retry time is ignored, and the due token is renewed."""
    auth = make_auth(timeout=10)
    now = clock.now
    due = _token(fake, now - 3595, now + 5)  # due, and closer to expiry than the timeout
    _plant_record(auth, edrv_auth._CacheRecord(due, renew_after=now + 86400))
    assert auth.get_token() != due.access_token.value
    assert fake.token_requests == 1


def test_a_record_with_an_invalid_token_is_ignored_whole(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """A record whose token is not one we could have written: its request times are ignored
    too, so they cannot hold the cap against this client."""
    auth = make_auth()
    now = clock.now
    document = {
        "version": 1,
        "token": {"access_token": "bad token", "obtained_at": now, "expires_at": now + 60},
        "token_requests": [now - 5] * 5,
        "renewed_at": None,
    }
    auth._describe().file_cache.ensure_dir()
    auth._describe().file_cache.path.write_text(json.dumps(document))
    auth._describe().file_cache.path.chmod(0o600)
    assert auth.get_token() in fake.issued_tokens
    assert fake.token_requests == 1


def test_past_the_cap_one_call_makes_one_api_request(
    fake: FakeEdrv, make_auth: MakeAuth, clock: Clock
) -> None:
    """Cap reached and the API rejects the token: the call gets its 401, with no resend of
    the same token."""
    auth = make_auth()
    now = clock.now
    token = _token(fake, now, now + 3600)
    _plant_record(auth, edrv_auth._CacheRecord(token, (now - 10,) * 5))
    fake.reject_all = True
    for client in ("requests", "httpx"):
        fake.reset_counters()
        if client == "requests":
            status = requests.get(f"{fake.url}/v1.1/x", auth=auth, timeout=5).status_code
        else:
            status = httpx.get(f"{fake.url}/v1.1/x", auth=auth).status_code
        assert (status, fake.api_requests, fake.token_requests) == (401, 1, 0)
