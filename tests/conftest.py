"""Shared fixtures: a clean environment, a loopback fake eDRV, and a leak watch.

Every test runs with no ``EDRV_*`` or proxy variables from the developer's shell,
with ``EDRV_AUTH_CACHE_DIR`` pointing into its own temporary folder, and with the
``edrv_auth`` logger captured at DEBUG: at the end of each test, no record may
contain the canary client secret, the canary API key or any token the fake
issued.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # tests import the fake server as `fake_edrv`

from fake_edrv import PROXY_VARIABLES, FakeEdrv  # noqa: E402

import edrv_auth  # noqa: E402

#: Distinctive fakes: if one of them shows up in a log, a message or a repr, the
#: watch below fails the test.
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-secret-canary-4b1d7e"
API_KEY = "test-api-key-canary-93c2a8"

#: What the ``make_auth`` fixture is: EdrvAuth's constructor with the fake's defaults.
MakeAuth = Callable[..., edrv_auth.EdrvAuth]


@contextlib.contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Children started in this block take Ctrl-C (SIGINT) as in a terminal, even when the
    suite runs with SIGINT ignored (started with `&`, nohup or a CI runner): an ignored
    signal stays ignored across exec, while a handled one starts at its default."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_python(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args``, its output captured as text; the exit is not checked."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _plant(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` at ``path`` (creating the 0700 cache folder) with exactly ``mode``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


# ---- child processes ----------------------------------------------------------


WORKER = Path(__file__).with_name("_proc_worker.py")

#: Python 3.12+ warns that fork() in a threaded process (the fake's threads) may deadlock.
fork_ok = pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Children:
    """Worker-script children; whatever happens, each is killed if alive and reaped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # where children leave files for the test
        self.procs: list[subprocess.Popen[str]] = []
        self.outputs: list[str] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-W", "error::ResourceWarning", str(WORKER), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def result(self, proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
        """Wait for a child that should succeed; return its JSON report."""
        out, err = proc.communicate(timeout=timeout)
        self.outputs += [out, err]
        assert (proc.returncode, err) == (0, "")
        report: dict[str, Any] = json.loads(out)
        return report

    def kill(self, proc: subprocess.Popen[str]) -> None:
        """SIGKILL a child (running or stopped) and reap it."""
        if proc.poll() is None:
            proc.kill()
        self._drain(proc)

    def reap_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
            self._drain(proc)

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        if proc.stdout is not None and not proc.stdout.closed:
            out, err = proc.communicate(timeout=30)
            self.outputs += [out, err]
        proc.wait(timeout=30)


@pytest.fixture
def children(fake: FakeEdrv, leak_watch: LeakWatch, tmp_path: Path) -> Iterator[Children]:
    """Script children, reaped at the end; their output must hold no secret and no token."""
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.reap_all()
    assert_no_leaks(leak_watch, fake, *kids.outputs)


def assert_no_leaks(leak_watch: LeakWatch, fake: FakeEdrv, *texts: str) -> None:
    leak_watch.secrets.update(fake.issued_tokens)
    assert leak_watch.leaks(*texts) == []


def wait_until(
    condition: Callable[[], bool], what: str, procs: Sequence[subprocess.Popen[str]] = ()
) -> None:
    """Poll ``condition``; fail fast if one of ``procs`` exits first, or after 20 s."""
    deadline = time.monotonic() + 20.0
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                pytest.fail(f"a child exited ({proc.returncode}) before {what}: {stderr[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def forked(target: Callable[..., None], *args: object) -> Iterator[tuple[Any, Connection]]:
    """Run ``target(*args, writer)`` in a forked child; yield it and the reading end."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(*args, writer), daemon=True)
    proc.start()
    writer.close()
    try:
        yield proc, reader
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        reader.close()


def finish_renewal(auth: edrv_auth.EdrvAuth) -> None:
    """Wait for the background renewal ``auth`` started last, if any (it ends within 25 s)."""
    renewal = auth._describe().renewal
    if renewal is not None:
        assert renewal.done.wait(timeout=30)


T = TypeVar("T")


def in_threads(count: int, call: Callable[[], T]) -> list[T]:
    """Run ``call`` in ``count`` threads released together; their results, or the first error."""
    start = threading.Barrier(count, timeout=10)
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            results.append(call())
        except BaseException as exc:  # re-raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


_CLEARED_PREFIXES = ("EDRV_",)
_CLEARED_NAMES = (
    *PROXY_VARIABLES,
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "requests_ca_bundle",
    "curl_ca_bundle",
    "ssl_cert_file",
    "ssl_cert_dir",
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, saying why, the tests this platform cannot run (markers in pyproject.toml)."""
    if item.get_closest_marker("posix_only") and os.name != "posix":
        pytest.skip("needs POSIX file modes, signals or a POSIX shell")
    fork = "fork" in multiprocessing.get_all_start_methods()
    if item.get_closest_marker("needs_fork") and not fork:
        pytest.skip("needs os.fork()")
    # CI on Linux installs redis-server: there its absence fails the test instead.
    ci_linux = bool(os.environ.get("CI")) and sys.platform.startswith("linux")
    if item.get_closest_marker("needs_redis") and not shutil.which("redis-server") and not ci_linux:
        pytest.skip("needs redis-server on PATH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate each test from the shell's EDRV_* and proxy variables."""
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED_NAMES:
            monkeypatch.delenv(name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDRV_AUTH_CACHE_DIR", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cache


class LeakWatch(logging.Handler):
    """Collects every formatted ``edrv_auth`` record, and the strings that must not leak."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []
        self.secrets: set[str] = {CLIENT_SECRET, API_KEY}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.messages.append(text)

    def leaks(self, *texts: str) -> list[str]:
        """The secrets found in the given texts and in every captured record."""
        return [s for s in self.secrets for t in (*texts, *self.messages) if s and s in t]


@pytest.fixture(autouse=True)
def leak_watch() -> Iterator[LeakWatch]:
    """Fail any test during which a secret or issued token reached the log."""
    logger = logging.getLogger("edrv_auth")
    watch = LeakWatch()
    old_level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old_level)
    assert watch.leaks() == [], "a secret or token reached the edrv_auth log"


def serve_watched(server: FakeEdrv, leak_watch: LeakWatch) -> Iterator[FakeEdrv]:
    """Run ``server`` for one test; the tokens it issued are added to the leak watch."""
    try:
        with server:
            yield server
    finally:
        leak_watch.secrets.update(server.issued_tokens)


@pytest.fixture
def fake(leak_watch: LeakWatch) -> Iterator[FakeEdrv]:
    """A running fake eDRV whose issued tokens are added to the leak watch."""
    yield from serve_watched(FakeEdrv(client_id=CLIENT_ID, client_secret=CLIENT_SECRET), leak_watch)


@pytest.fixture
def other() -> Iterator[FakeEdrv]:
    """A second server: another origin (same host 127.0.0.1, another port)."""
    with FakeEdrv() as server:
        yield server


def auth_maker(server: FakeEdrv, **defaults: Any) -> MakeAuth:
    """Build EdrvAuth instances pointed at ``server``, with ``defaults`` then overrides."""

    def make(**overrides: Any) -> edrv_auth.EdrvAuth:
        options: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_url": server.token_url,
            "api_url": server.url,
            **defaults,
            **overrides,
        }
        return edrv_auth.EdrvAuth(**options)

    return make


@pytest.fixture
def make_auth(fake: FakeEdrv, clean_env: Path) -> MakeAuth:
    """Build an EdrvAuth pointed at the fake, with the test's cache folder."""
    return auth_maker(fake, cache_dir=clean_env)


@pytest.fixture
def fake_env(fake: FakeEdrv, monkeypatch: pytest.MonkeyPatch) -> FakeEdrv:
    """Point the EDRV_* variables at the fake (for child processes and the CLI)."""
    for name, value in fake.environment().items():
        monkeypatch.setenv(name, value)
    return fake


class Clock:
    """edrv_auth's one clock, replaced for a test: tests move it instead of sleeping.

    Wall time is frozen (at the real time when the test began) unless ``frozen``
    is false; monotonic time runs for real, and ``advance`` moves both. Sleeps
    are recorded in ``slept`` and move the clock instead of waiting when
    ``slept`` is a list.
    """

    def __init__(self) -> None:
        self.frozen_at: float | None = None
        self.offset = 0.0
        self.slept: list[float] | None = None

    @property
    def now(self) -> float:
        return self.time()

    @now.setter
    def now(self, moment: float) -> None:
        self.offset += moment - self.time()

    def time(self) -> float:
        base = time.time() if self.frozen_at is None else self.frozen_at
        return base + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float) -> None:
        if self.slept is None:
            time.sleep(seconds)
        else:
            self.slept.append(seconds)
            self.offset += seconds  # time passes, without the wait

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def test_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """edrv_auth's clock for this test: real until `clock` or `no_sleep` changes it."""
    fake_clock = Clock()
    monkeypatch.setattr(edrv_auth, "_clock", fake_clock)
    return fake_clock


@pytest.fixture
def clock(test_clock: Clock) -> Clock:
    """Freeze edrv_auth's wall clock at the real time; tests move it with advance()."""
    test_clock.frozen_at = time.time()
    return test_clock


@pytest.fixture
def no_sleep(test_clock: Clock) -> list[float]:
    """Record the token request's backoff sleeps instead of sleeping."""
    test_clock.slept = []
    return test_clock.slept
