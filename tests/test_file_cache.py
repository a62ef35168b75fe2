"""The token cache file, with real files, locks and threads.

Every test talks to the loopback fake through ``EdrvAuth.get_token()`` and looks at
what really landed on disk: modes with ``os.stat``, contents with ``json.loads``,
atomicity through inode numbers and a concurrent reader. Untrusted files are
planted by hand and must be ignored and replaced by exactly one fresh token.
Mocks appear only to inject faults: the clock, and ``os.replace`` failing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Clock,
    MakeAuth,
    _plant,
    finish_renewal,
    in_threads,
)
from fake_edrv import FakeEdrv

import edrv_auth

pytestmark = pytest.mark.posix_only  # file modes, owners, symlinks and FIFOs


# ---- helpers ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edrv_auth" and r.levelno == logging.WARNING]


def _valid_payload(token: str, now: float | None = None) -> dict[str, Any]:
    """A cache file body that edrv_auth would trust, holding ``token`` for an hour."""
    now = time.time() if now is None else now
    return {
        "version": 1,
        "token": {
            "access_token": token,
            "obtained_at": now,
            "expires_at": now + 3600,
            "scope": "read:chargestations",
        },
        "token_requests": [],
    }


def _temporaries(directory: Path) -> list[str]:
    """Files in the cache folder other than the cache file and its lock."""
    return sorted(p.name for p in directory.iterdir() if p.suffix not in (".json", ".lock"))


def _assert_holds_good_token(auth: edrv_auth.EdrvAuth, token: str) -> None:
    """The cache file is a trusted regular 0600 file whose token is ``token``."""
    path = auth._describe().file_cache.path
    assert not path.is_symlink()
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert _mode(path) == 0o600
    state = auth._describe().file_cache.read()
    assert state is not None
    assert state.token is not None
    assert state.token.access_token.value == token


# ---- modes, laziness, contents --------------------------------------------


def test_construction_creates_nothing(make_auth: MakeAuth, clean_env: Path) -> None:
    """Constructing EdrvAuth creates neither the cache folder nor any file in it."""
    auth = make_auth()
    assert not clean_env.exists()
    assert not os.path.lexists(auth._describe().file_cache.path)


@pytest.mark.parametrize(
    "umask", [0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"]
)
def test_modes_do_not_depend_on_umask(
    make_auth: MakeAuth, clean_env: Path, fake: FakeEdrv, umask: int
) -> None:
    """The cache folder is created 0700, the cache and lock files 0600, under a umask of 0
    as under one that would leave their owner no write permission."""
    old = os.umask(umask)
    try:
        auth = make_auth()
        auth.get_token()
    finally:
        os.umask(old)
    assert fake.token_requests == 1
    assert _mode(clean_env) == 0o700
    assert _mode(auth._describe().file_cache.path) == 0o600
    assert _mode(auth._describe().file_cache.lock_path) == 0o600


def test_file_holds_token_and_times_but_no_secret(
    make_auth: MakeAuth, fake: FakeEdrv, clock: Clock
) -> None:
    """The cache file is JSON with token, obtained_at, expires_at and scope, and no secret."""
    auth = make_auth()
    token = auth.get_token()
    raw = auth._describe().file_cache.path.read_text()
    assert CLIENT_SECRET not in raw
    data = json.loads(raw)
    assert data["token"] == {
        "access_token": token,
        "obtained_at": clock.now,
        "expires_at": clock.now + fake.expires_in,
        "scope": fake.scope,
    }


def test_second_instance_reuses_file_token(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """A second EdrvAuth sharing the cache folder takes the token from the file, with no request."""
    first = make_auth().get_token()
    second = make_auth().get_token()
    assert second == first
    assert fake.token_requests == 1


def test_file_name_depends_on_credentials_but_reveals_none(
    make_auth: MakeAuth, fake: FakeEdrv
) -> None:
    """Another client_id, audience or token_url gets another file, named without the id or URL."""
    base = make_auth()._describe().file_cache.path
    assert make_auth()._describe().file_cache.path == base  # same configuration, same file
    others = [
        make_auth(client_id="test-other-client")._describe().file_cache.path,
        make_auth(audience="https://other.edrv.io")._describe().file_cache.path,
        make_auth(token_url=fake.url + "/other/token")._describe().file_cache.path,
    ]
    assert len({base, *others}) == 4
    for path in (base, *others):
        for revealing in (
            CLIENT_ID,
            "test-other-client",
            "127.0.0.1",
            str(urlsplit(fake.url).port),
            "oauth",
        ):
            assert revealing not in path.name


# ---- atomic replacement ----------------------------------------------------


def test_each_write_replaces_the_inode_and_leaves_no_temporaries(
    make_auth: MakeAuth, fake: FakeEdrv, clock: Clock, clean_env: Path
) -> None:
    """Every write is a rename of a new file (new inode), and no temporary file is left behind."""
    auth = make_auth()
    auth.get_token()
    first = os.stat(auth._describe().file_cache.path).st_ino
    clock.advance(fake.expires_in)  # past refresh: a new token, a new write
    auth.get_token()
    second = os.stat(auth._describe().file_cache.path).st_ino
    auth.clear()  # rewrites the file without the token (the request record stays)
    third = os.stat(auth._describe().file_cache.path).st_ino
    assert fake.token_requests == 2
    assert first != second
    assert second != third
    assert _temporaries(clean_env) == []


def test_concurrent_reader_never_sees_half_a_file(make_auth: MakeAuth) -> None:
    """A reader looping read() while a writer loops write() for 0.5 s always gets a whole state."""
    cache = make_auth()._describe().file_cache
    now = time.time()
    tokens = ("fake-token-reader-writer-a" * 40, "fake-token-reader-writer-b")
    states = [
        edrv_auth._CacheRecord(edrv_auth._Token(edrv_auth._Secret(t), now, now + 3600, "s"), (now,))
        for t in tokens
    ]
    cache.write(states[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    bad: list[object] = []
    counts = {"reads": 0, "writes": 0}

    def writer() -> None:
        try:
            while not stop.is_set():
                cache.write(states[counts["writes"] % 2])
                counts["writes"] += 1
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                state = cache.read()
                counts["reads"] += 1
                if state not in states:
                    bad.append(state)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)  # the duration of the race, not a wait for an expiry
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    if errors:
        raise errors[0]
    assert bad == []
    assert counts["writes"] > 1
    assert counts["reads"] > 1
    assert _temporaries(cache.directory) == []


def test_leftovers_of_a_killed_writer_are_removed(fake: FakeEdrv, make_auth: MakeAuth) -> None:
    """Old temporary files (a writer killed before its rename) go at the next write."""
    import os

    auth = make_auth()
    auth._describe().file_cache.ensure_dir()
    old = (
        auth._describe().file_cache.directory
        / f".{auth._describe().file_cache.path.name}.4242.deadbeef"
    )
    fresh = (
        auth._describe().file_cache.directory
        / f".{auth._describe().file_cache.path.name}.4243.cafebabe"
    )
    for leftover in (old, fresh):
        leftover.write_bytes(b"{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    auth.get_token()
    assert not old.exists()
    assert fresh.exists()  # may still belong to a writer at work


# ---- untrusted files -------------------------------------------------------


def _body(kind: str, token: str) -> bytes:
    """The bytes of an untrusted cache file of the given kind (around a valid-looking token)."""
    payload = _valid_payload(token)
    good = json.dumps(payload).encode()
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not-json":
        return b"this is not JSON at all\n"
    if kind == "list":
        return json.dumps([payload]).encode()
    if kind == "missing-token-requests":
        del payload["token_requests"]
    elif kind == "missing-expires-at":
        del payload["token"]["expires_at"]
    elif kind == "access-token-not-string":
        payload["token"]["access_token"] = 123456
    elif kind == "expires-at-string":
        payload["token"]["expires_at"] = str(payload["token"]["expires_at"])
    elif kind == "obtained-after-expiry":
        payload["token"]["obtained_at"] = payload["token"]["expires_at"] + 3600
    elif kind == "version-2":
        payload["version"] = 2
    elif kind == "expired":
        payload["token"]["obtained_at"] -= 7200
        payload["token"]["expires_at"] -= 7200
    else:
        raise AssertionError(kind)
    return json.dumps(payload).encode()


def test_valid_planted_file_is_trusted(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """Control for the tests below: a well-formed planted file is used as is, with no request."""
    auth = make_auth()
    seeded = fake.issue_token()
    _plant(auth._describe().file_cache.path, json.dumps(_valid_payload(seeded)).encode())
    assert auth.get_token() == seeded
    assert fake.token_requests == 0


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "truncated",
        "not-json",
        "list",
        "missing-token-requests",
        "missing-expires-at",
        "access-token-not-string",
        "expires-at-string",
        "obtained-after-expiry",
        "version-2",
        "expired",
    ],
)
def test_malformed_file_is_replaced_by_a_fresh_token(
    make_auth: MakeAuth, fake: FakeEdrv, kind: str
) -> None:
    """An empty, truncated, non-JSON, misshapen or expired file is replaced by one fresh token."""
    auth = make_auth()
    seeded = fake.issue_token()
    _plant(auth._describe().file_cache.path, _body(kind, seeded))
    token = auth.get_token()
    assert fake.token_requests == 1
    assert token != seeded
    _assert_holds_good_token(auth, token)


@pytest.mark.parametrize("mode", [0o660, 0o606], ids=["group-writable", "others-writable"])
def test_writable_by_others_file_is_replaced(
    make_auth: MakeAuth, fake: FakeEdrv, mode: int
) -> None:
    """A valid-looking cache file writable by group or others is not trusted and is replaced."""
    auth = make_auth()
    seeded = fake.issue_token()
    _plant(auth._describe().file_cache.path, json.dumps(_valid_payload(seeded)).encode(), mode=mode)
    token = auth.get_token()
    assert fake.token_requests == 1
    assert token != seeded
    _assert_holds_good_token(auth, token)


def test_file_owned_by_another_user_is_replaced(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """A valid-looking cache file owned by another user is not trusted and is replaced."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root; this suite normally runs as root")
    auth = make_auth()
    seeded = fake.issue_token()
    _plant(auth._describe().file_cache.path, json.dumps(_valid_payload(seeded)).encode())
    os.chown(auth._describe().file_cache.path, 65534, 65534)
    token = auth.get_token()
    assert fake.token_requests == 1
    assert token != seeded
    _assert_holds_good_token(auth, token)
    assert os.stat(auth._describe().file_cache.path).st_uid == os.getuid()


def test_symlink_is_replaced_and_its_target_untouched(
    make_auth: MakeAuth, fake: FakeEdrv, tmp_path: Path
) -> None:
    """A symlink cache file is not followed: a regular file replaces it, its target is untouched."""
    auth = make_auth()
    seeded = fake.issue_token()
    target = tmp_path / "elsewhere.json"
    original = json.dumps(_valid_payload(seeded)).encode()
    target.write_bytes(original)
    os.chmod(target, 0o600)
    auth._describe().file_cache.path.parent.mkdir(mode=0o700)
    auth._describe().file_cache.path.symlink_to(target)
    token = auth.get_token()
    assert fake.token_requests == 1
    assert token != seeded
    _assert_holds_good_token(auth, token)
    assert not target.is_symlink()
    assert target.read_bytes() == original


def test_directory_in_place_of_file_degrades_to_memory(
    make_auth: MakeAuth, fake: FakeEdrv, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory where the cache file belongs degrades to memory, with exactly one warning."""
    auth = make_auth()
    auth._describe().file_cache.path.mkdir(mode=0o700, parents=True)
    first = auth.get_token()
    assert auth.get_token() == first
    assert fake.token_requests == 1
    clock.advance(fake.expires_in)  # force a refresh, which tries to write again
    assert auth.get_token() != first
    assert fake.token_requests == 2
    assert len(_warnings(caplog)) == 1
    assert auth._describe().file_cache.path.is_dir()
    assert _temporaries(auth._describe().file_cache.directory) == []


# ---- a cache folder that cannot be used -----------------------------------


def test_threads_share_one_token_request_without_a_usable_cache(
    make_auth: MakeAuth, fake: FakeEdrv, tmp_path: Path
) -> None:
    """With no cache folder to lock, the threads of one process still make one token
    request: the in-process lock alone keeps them in single file."""
    (tmp_path / "afile").write_text("a regular file, so nothing can be created below it")
    auth = make_auth(cache_dir=tmp_path / "afile" / "cache")
    fake.token_delay = 0.3  # keep the first request in flight while the others arrive
    tokens = in_threads(8, auth.get_token)
    assert len(set(tokens)) == 1
    assert fake.token_requests == 1


def test_uncreatable_cache_dir_works_from_memory(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    tmp_path: Path,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache folder that cannot be created keeps the token in memory, warning exactly once."""
    (tmp_path / "afile").write_text("a regular file, so nothing can be created below it")
    auth = make_auth(cache_dir=tmp_path / "afile" / "cache")
    first = auth.get_token()
    assert fake.token_requests == 1
    assert auth.get_token() == first
    assert fake.token_requests == 1
    clock.advance(fake.expires_in)  # a refresh tries the folder again
    assert auth.get_token() != first
    auth.clear()
    auth.get_token()
    assert fake.token_requests == 3
    assert len(_warnings(caplog)) == 1


def test_group_writable_cache_folder_of_ours_is_made_private(
    make_auth: MakeAuth, fake: FakeEdrv, clean_env: Path
) -> None:
    """An existing cache folder of ours that group or others may write is made 0700 first."""
    clean_env.mkdir()
    os.chmod(clean_env, 0o777)  # noqa: S103 - the folder under test must be that lax
    auth = make_auth()
    token = auth.get_token()
    assert _mode(clean_env) == 0o700
    _assert_holds_good_token(auth, token)
    assert fake.token_requests == 1


def test_cache_folder_of_another_user_is_not_used(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    clean_env: Path,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache folder owned by another user is neither read nor written: memory, one warning."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root; this suite normally runs as root")
    clean_env.mkdir(mode=0o700)
    seeded = fake.issue_token()
    planted = clean_env / make_auth()._describe().file_cache.path.name
    payload = json.dumps(_valid_payload(seeded)).encode()
    _plant(planted, payload)
    os.chown(clean_env, 65534, 65534)
    auth = make_auth()
    first = auth.get_token()
    assert first != seeded  # the planted file, though ours, sits in a folder that is not
    clock.advance(fake.expires_in)  # a renewal tries the folder again
    assert auth.get_token() != first
    assert fake.token_requests == 2
    assert sorted(p.name for p in clean_env.iterdir()) == [planted.name]  # no lock, no write
    assert planted.read_bytes() == payload
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "owned by another user" in warnings[0].getMessage()


def test_symlink_in_place_of_the_cache_folder_is_not_used(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    clean_env: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A symbolic link where the cache folder belongs is not followed: memory, one warning."""
    target = tmp_path / "chosen-by-someone"
    target.mkdir(mode=0o700)
    clean_env.symlink_to(target)
    auth = make_auth()
    token = auth.get_token()
    assert auth.get_token() == token
    assert make_auth().get_token() != token  # nothing shared through the link
    assert list(target.iterdir()) == []
    assert clean_env.is_symlink()
    assert len(_warnings(caplog)) == 2  # one per instance
    assert "a symlink" in _warnings(caplog)[0].getMessage()


def test_cache_dir_deleted_while_running_is_recreated(
    make_auth: MakeAuth, fake: FakeEdrv, clock: Clock, clean_env: Path
) -> None:
    """If the cache folder disappears, the next refresh recreates it (0700) and saves the token."""
    auth = make_auth()
    first = auth.get_token()
    shutil.rmtree(clean_env)
    clock.advance(fake.expires_in)
    second = auth.get_token()
    assert second != first
    assert fake.token_requests == 2
    assert _mode(clean_env) == 0o700
    _assert_holds_good_token(auth, second)


def test_write_failure_still_returns_the_token(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing rename (disk full) still yields the token, warns, and leaves no temporary file."""

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    auth = make_auth()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", disk_full)
        token = auth.get_token()
    assert fake.token_requests == 1
    assert token in fake.issued_tokens
    assert auth.get_token() == token  # kept in memory
    assert fake.token_requests == 1
    assert len(_warnings(caplog)) == 1
    assert not auth._describe().file_cache.path.exists()
    assert _temporaries(clean_env) == []


# ---- clear() ---------------------------------------------------------------


def test_clear_forgets_the_token_on_disk_and_in_memory(make_auth: MakeAuth, fake: FakeEdrv) -> None:
    """After clear() the token is gone from file and memory: the next get_token makes 1 request."""
    auth = make_auth()
    first = auth.get_token()
    auth.clear()
    path = auth._describe().file_cache.path
    assert not path.exists() or first not in path.read_text()
    state = auth._describe().file_cache.read()
    assert state is None or state.token is None
    second = auth.get_token()
    assert second != first
    assert fake.token_requests == 2
    assert make_auth().get_token() == second  # the new one is shared again
    assert fake.token_requests == 2


def test_clear_on_cold_cache_creates_nothing(make_auth: MakeAuth, clean_env: Path) -> None:
    """clear() with nothing cached creates neither the folder nor a file."""
    make_auth().clear()
    assert not clean_env.exists()


# ---- expiry and the refresh margin ----------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "kept_until", "replaced_at"),
    [(3600, 3299, 3301), (60, 29, 31)],
    ids=["margin-300", "margin-shrinks-to-half-lifetime"],
)
def test_refresh_margin(
    make_auth: MakeAuth,
    fake: FakeEdrv,
    clock: Clock,
    expires_in: int,
    kept_until: int,
    replaced_at: int,
) -> None:
    """A token is kept until refresh_margin before expiry, or half its life if that is shorter;
    then it is replaced (in the background here: it outlives the renewal)."""
    fake.expires_in = expires_in
    auth = make_auth(refresh_margin=300)
    start = clock.now
    first = auth.get_token()
    clock.advance(kept_until)
    assert auth.get_token() == first
    assert make_auth().get_token() == first  # another instance, from the file
    assert fake.token_requests == 1
    clock.now = start + replaced_at
    assert auth.get_token() == first  # sent while the renewal runs
    finish_renewal(auth)
    second = auth.get_token()
    assert second != first
    assert fake.token_requests == 2
