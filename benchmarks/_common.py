"""Shared pieces of the benchmark suite.

The fake eDRV (``tests/fake_edrv.py``) always runs in the benchmark script's own process,
which does nothing else while it measures: the code being measured runs in child processes
(``_worker.py``, ``python -c`` snippets), so the fake's threads never share a GIL with it.
Children get their configuration from ``EDRV_*`` / ``BENCH_*`` environment variables.

Every loop in the suite is bounded both in count and in time (:func:`bounded`), and every
child process is waited for with a timeout.

``BENCH_MODULE_DIR`` (optional) names a folder holding another ``edrv_auth.py`` to
measure instead of the repository's, for before/after comparisons.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
#: Where the measured ``edrv_auth.py`` lives.
MODULE_DIR = Path(os.environ.get("BENCH_MODULE_DIR") or ROOT).resolve()
for _path in (str(BENCH_DIR), str(ROOT / "tests"), str(MODULE_DIR)):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)  # the module folder ends up first

from fake_edrv import PROXY_VARIABLES, FakeEdrv  # noqa: E402

#: The API path every benchmark request asks for (the fake answers any /v1.1/... path).
API_PATH = "/v1.1/chargestations"
#: Peer libraries: import name -> PyPI name (benchmarks/requirements.txt installs them).
PEERS = {"authlib": "authlib", "requests_auth": "requests-auth", "httpx_auth": "httpx-auth"}

_CLEARED_PREFIXES = ("EDRV_", "BENCH_")
_CLEARED_NAMES = PROXY_VARIABLES


# ---- Settings shared with child processes ----------------------------------


@dataclass
class Settings:
    """What a child needs to reach the fake: URLs, credentials, cache folder, a static token."""

    token_url: str
    api_url: str
    client_id: str
    client_secret: str
    audience: str
    cache_dir: str
    static_token: str
    #: The fake does not take HTTP Basic client authentication: peers that send the client
    #: credentials that way get them moved into the form (see ``_impls.py``).
    basic_shim: bool

    @property
    def url(self) -> str:
        """The API URL every benchmark request GETs."""
        return self.api_url + API_PATH

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A child environment: the caller's, without proxies or stray EDRV_*, plus ours."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(_CLEARED_PREFIXES) and name not in _CLEARED_NAMES
        }
        env.update(
            EDRV_CLIENT_ID=self.client_id,
            EDRV_CLIENT_SECRET=self.client_secret,
            EDRV_TOKEN_URL=self.token_url,
            EDRV_API_URL=self.api_url,
            EDRV_AUTH_CACHE_DIR=self.cache_dir,
            BENCH_AUDIENCE=self.audience,
            BENCH_STATIC_TOKEN=self.static_token,
            BENCH_BASIC_SHIM="1" if self.basic_shim else "0",
            PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(BENCH_DIR)]),
            BENCH_MODULE_DIR=str(MODULE_DIR),
        )
        env.update(extra or {})
        return env

    @classmethod
    def from_env(cls) -> Settings:
        """The settings a parent passed down with :meth:`env`."""
        env = os.environ
        return cls(
            token_url=env["EDRV_TOKEN_URL"],
            api_url=env["EDRV_API_URL"],
            client_id=env["EDRV_CLIENT_ID"],
            client_secret=env["EDRV_CLIENT_SECRET"],
            audience=env["BENCH_AUDIENCE"],
            cache_dir=env["EDRV_AUTH_CACHE_DIR"],
            static_token=env["BENCH_STATIC_TOKEN"],
            basic_shim=env.get("BENCH_BASIC_SHIM") == "1",
        )


@contextlib.contextmanager
def fake_edrv(token_delay: float = 0.0) -> Iterator[tuple[FakeEdrv, Path, bool]]:
    """Start the tests' fake eDRV on 127.0.0.1 and make a scratch folder for caches.

    Yields the fake, the folder, and whether peers need the Basic-auth shim (the fake does
    not take HTTP Basic client credentials: :func:`fake_accepts_basic`).
    """
    scratch = Path(tempfile.mkdtemp(prefix="edrv-bench-"))
    fake = FakeEdrv(host="127.0.0.1").start()
    try:
        fake.token_delay = token_delay
        yield fake, scratch, not fake_accepts_basic(fake)
    finally:
        fake.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def settings_for(fake: FakeEdrv, cache_dir: Path, basic_shim: bool) -> Settings:
    """Settings pointing at ``fake``, with a fresh static token and ``cache_dir``."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Settings(
        token_url=fake.token_url,
        api_url=fake.url,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        audience=fake.audience,
        cache_dir=str(cache_dir),
        static_token=fake.issue_token(),  # minted directly: no token request counted
        basic_shim=basic_shim,
    )


def fake_accepts_basic(fake: FakeEdrv) -> bool:
    """Whether the fake takes client credentials as HTTP Basic auth (RFC 6749 section 2.3.1).

    ``requests-auth`` and ``httpx-auth`` send them that way. The probe's token request is
    removed from the counters.
    """
    credentials = f"{fake.client_id}:{fake.client_secret}".encode()
    form = {"grant_type": "client_credentials", "audience": fake.audience}
    request = urllib.request.Request(
        fake.token_url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(credentials).decode()},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            accepted = bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        exc.close()
        accepted = False
    fake.reset_counters()
    return accepted


def shim_notes(shim: bool, ran: Iterable[str]) -> list[str]:
    """The footnote saying that the Basic-auth shim was used, if a peer that needs it ran."""
    shimmed = sorted({"requests-auth", "httpx-auth"} & set(ran))
    if not shim or not shimmed:
        return []
    return [
        f"{', '.join(shimmed)}: client credentials moved from HTTP Basic auth into the form "
        "(the fake accepts only the form)"
    ]


def peer_available(module: str) -> bool:
    """Whether a peer library is importable (benchmarks skip its rows otherwise)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- Bounded loops and statistics ------------------------------------------


def bounded(count: int, seconds: float) -> Iterator[int]:
    """Yield ``0 .. count-1``, stopping early once ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    for index in range(count):
        if index and time.monotonic() >= deadline:
            return
        yield index


def median(values: Iterable[float]) -> float | None:
    """The median, or ``None`` for no values."""
    data = list(values)
    return statistics.median(data) if data else None


# ---- Child processes: start, "ready", "go", result --------------------------


@dataclass
class Child:
    """A child process speaking the ready/go protocol of ``_worker.py``."""

    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    label: str


def spawn(args: Sequence[str], env: dict[str, str], label: str) -> Child:
    """Start ``python args...`` with pipes for the protocol and stderr in a temporary file."""
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by collect() or kill()
    process = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=ROOT,
    )
    return Child(process, stderr, label)


def wait_ready(children: Sequence[Child], timeout: float) -> None:
    """Wait until every child printed ``READY`` (or raise, killing them all)."""
    deadline = time.monotonic() + timeout
    pending = {child.process.stdout.fileno(): child for child in children if child.process.stdout}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            labels = [c.label for c in pending.values()]
            kill(children)
            raise RuntimeError(f"children never got ready: {labels}")
        readable, _, _ = select.select(list(pending), [], [], left)
        for fd in readable:
            child = pending.pop(fd)
            assert child.process.stdout is not None
            line = child.process.stdout.readline().strip()
            if line != b"READY":
                message = f"{child.label} failed to start: {line!r}\n{error_text(child)}"
                kill(children)
                raise RuntimeError(message)


def go(children: Sequence[Child]) -> float:
    """Tell every ready child to start; return the moment (``time.monotonic()``)."""
    started = time.monotonic()
    for child in children:
        assert child.process.stdin is not None
        child.process.stdin.write(b"GO\n")
        child.process.stdin.flush()
    return started


def collect(children: Sequence[Child], timeout: float) -> list[dict[str, Any]]:
    """Each child's JSON result (its last stdout line), waiting at most ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    results = []
    for child in children:
        try:
            out, _ = child.process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            kill(children)
            raise RuntimeError(f"{child.label} did not finish in time") from None
        lines = out.decode(errors="replace").strip().splitlines()
        if child.process.returncode != 0 or not lines:
            message = f"{child.label} exited {child.process.returncode}\n{error_text(child)}"
            kill(children)
            raise RuntimeError(message)
        results.append(json.loads(lines[-1]))
        child.stderr.close()
    return results


def error_text(child: Child, limit: int = 4000) -> str:
    """The tail of a child's stderr, for error messages."""
    with contextlib.suppress(ValueError, OSError):
        child.stderr.seek(0)
        return child.stderr.read().decode(errors="replace")[-limit:]
    return ""


def kill(children: Sequence[Child]) -> None:
    """Kill the given children (ours, by pid) and reap them."""
    for child in children:
        if child.process.poll() is None:
            child.process.kill()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5)
        for pipe in (child.process.stdin, child.process.stdout, child.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def run_children(
    args_list: Sequence[tuple[Sequence[str], str]],
    env: dict[str, str],
    *,
    ready_timeout: float = 60.0,
    run_timeout: float = 60.0,
) -> tuple[float, float, list[dict[str, Any]]]:
    """Start children, wait until all are ready, start them together, collect results.

    Returns (go time, time the last result arrived, results), times from ``time.monotonic()``.
    """
    children = [spawn(args, env, label) for args, label in args_list]
    try:
        wait_ready(children, ready_timeout)
        started = go(children)
        results = collect(children, run_timeout)
        return started, time.monotonic(), results
    finally:
        kill(children)


# ---- Output: tables, targets, JSON ------------------------------------------


def fmt(value: object, digits: int = 2) -> str:
    """A table cell: numbers rounded, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: Sequence[str] = ()
) -> None:
    """Print a plain-text table with a title and footnotes."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n## {title}\n")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for note in notes:
        print(f"  * {note}")
    sys.stdout.flush()


def target(
    name: str, value: float | None, limit: float, kind: str, unit: str = ""
) -> dict[str, Any]:
    """One target check: ``kind`` is ``max`` (value <= limit), ``min`` (>=) or ``eq``."""
    if value is None:
        passed = False
    elif kind == "max":
        passed = value <= limit
    elif kind == "min":
        passed = value >= limit
    else:
        passed = value == limit
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "kind": kind,
        "unit": unit,
        "passed": passed,
    }


def describe_target(check: dict[str, Any]) -> str:
    """``PASS name: value (target <= limit)`` for one target check."""
    symbol = {"max": "<=", "min": ">=", "eq": "=="}[check["kind"]]
    unit = f" {check['unit']}" if check["unit"] else ""
    value = check["value"]
    shown = "not measured" if value is None else f"{fmt(value, 3)}{unit}"
    verdict = "PASS" if check["passed"] else "FAIL"
    return f"{verdict}  {check['name']}: {shown} (target {symbol} {fmt(check['limit'], 3)}{unit})"


def print_targets(checks: Sequence[dict[str, Any]]) -> None:
    """Print every target check of one benchmark."""
    print("\nTargets:")
    for check in checks:
        print(f"  {describe_target(check)}")
    sys.stdout.flush()


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The common command line: ``--json PATH`` to write the results."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return parser


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (if given) as indented JSON."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def machine() -> dict[str, Any]:
    """A few facts about the run, stored with every JSON result."""
    import platform

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish(
    json_path: str | None, benchmark: str, checks: Sequence[dict[str, Any]], **parts: Any
) -> None:
    """Print the target checks, then write the JSON result (``--json``), if asked for.

    The result holds the benchmark's name, :func:`machine`, the ``parts`` (rows, runs,
    notes...) and the target checks.
    """
    print_targets(checks)
    data = {"benchmark": benchmark, "machine": machine(), **parts, "targets": list(checks)}
    write_json(json_path, data)
