"""The child-process side of tests/test_processes.py.

Run as a script (``python tests/_proc_worker.py MODE ...``) it configures ``EdrvAuth`` from
the inherited ``EDRV_*`` variables and prints one JSON object on stdout. Imported (by a
``multiprocessing`` spawn worker) it provides the pool functions. It never prints a token:
only its SHA-256, so that the parent can compare tokens without a secret reaching a pipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import edrv_auth  # noqa: E402

#: Longest a child waits for the parent's "go" file before giving up.
_GO_TIMEOUT = 30.0


def api_url() -> str:
    """The fake's API endpoint that every child calls."""
    return os.environ["EDRV_API_URL"] + "/v1.1/x"


def digest(token: str) -> str:
    """A token's SHA-256, safe to print."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---- Pool functions (multiprocessing spawn workers) -----------------------


def pool_request(auth: edrv_auth.EdrvAuth, url: str) -> int:
    """Make one requests call with an unpickled ``auth``; return the status code."""
    import requests

    with requests.Session() as session:
        return session.get(url, auth=auth, timeout=30).status_code


def pool_get_token(auth: edrv_auth.EdrvAuth) -> str:
    """Get a token with an unpickled ``auth``; return its digest (errors propagate)."""
    return digest(auth.get_token())


# ---- Script modes ----------------------------------------------------------


def _wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def _thread_calls(client: str, auth: edrv_auth.EdrvAuth, count: int, out: dict[str, Any]) -> None:
    """Make ``count`` calls to the API; record statuses and error descriptions."""
    for _ in range(count):
        try:
            if client == "httpx":
                import httpx

                with httpx.Client(auth=auth, timeout=30) as client_:
                    out["statuses"].append(client_.get(api_url()).status_code)
            else:
                import requests

                with requests.Session() as session:
                    out["statuses"].append(
                        session.get(api_url(), auth=auth, timeout=30).status_code
                    )
        except Exception as exc:  # reported to the parent, which asserts on it
            out["errors"].append(f"{type(exc).__name__}: {exc}")


def herd(args: argparse.Namespace) -> dict[str, Any]:
    """Threads, each with its own EdrvAuth from the environment, call the API together."""
    out: dict[str, Any] = {"statuses": [], "errors": []}
    lock = threading.Lock()
    barrier = threading.Barrier(args.threads + 1)
    go = Path(args.go) if args.go else None

    def run() -> None:
        mine: dict[str, Any] = {"statuses": [], "errors": []}
        try:
            auth = edrv_auth.EdrvAuth()
            if args.preload:
                auth.get_token()  # hold the cached token in memory before the start
            barrier.wait(_GO_TIMEOUT)
            if go is not None:
                _wait_for_file(go, _GO_TIMEOUT)
            _thread_calls(args.client, auth, args.requests, mine)
        except Exception as exc:  # reported to the parent, which asserts on it
            mine["errors"].append(f"{type(exc).__name__}: {exc}")
            barrier.abort()  # never leave the others waiting for this thread
        with lock:
            out["statuses"] += mine["statuses"]
            out["errors"] += mine["errors"]

    threads = [threading.Thread(target=run) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(_GO_TIMEOUT)
    except threading.BrokenBarrierError:
        pass  # a thread failed before the start: report its error, never signal "ready"
    else:
        if args.ready:
            (Path(args.ready) / str(os.getpid())).touch()
    for thread in threads:
        thread.join()
    return out


def hold_lock(args: argparse.Namespace) -> dict[str, Any]:
    """Take the token cache lock, say so, and keep it until killed."""
    auth = edrv_auth.EdrvAuth()
    auth._describe().file_cache.ensure_dir()
    lock = auth._describe().file_cache.make_lock()
    lock.acquire()
    Path(args.ready).touch()
    while True:
        time.sleep(60)


def token(args: argparse.Namespace) -> dict[str, Any]:
    """Get one token; report its digest or the error, and how long it took.

    ``--go``: start when that file appears. ``--calls N``: then call the API N
    times and report the longest call. ``ended`` is the wall-clock time at the
    end, to compare across processes.
    """
    if args.lock_timeout is not None:
        edrv_auth._LOCK_TIMEOUT = args.lock_timeout
    auth = edrv_auth.EdrvAuth()
    if args.go:
        _wait_for_file(Path(args.go), _GO_TIMEOUT)
    started = time.monotonic()
    out: dict[str, Any]
    try:
        out = {"token_sha256": digest(auth.get_token())}
    except edrv_auth.EdrvAuthError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    out["elapsed"] = time.monotonic() - started
    out["ended"] = time.time()
    if args.calls:
        import requests

        longest = 0.0
        with requests.Session() as session:
            for _ in range(args.calls):
                began = time.monotonic()
                session.get(api_url(), auth=auth, timeout=30).raise_for_status()
                longest = max(longest, time.monotonic() - began)
        out["longest_call"] = longest
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    herd_parser = modes.add_parser("herd")
    herd_parser.add_argument("--threads", type=int, default=1)
    herd_parser.add_argument("--requests", type=int, default=1)
    herd_parser.add_argument("--client", choices=["requests", "httpx"], default="requests")
    herd_parser.add_argument("--preload", action="store_true")
    herd_parser.add_argument("--ready", help="folder where the child signals it is ready")
    herd_parser.add_argument("--go", help="file whose appearance starts the calls")
    lock_parser = modes.add_parser("hold-lock")
    lock_parser.add_argument("--ready", required=True, help="file created once the lock is held")
    token_parser = modes.add_parser("token")
    token_parser.add_argument("--lock-timeout", type=float)
    token_parser.add_argument("--go", help="file whose appearance starts the request")
    token_parser.add_argument("--calls", type=int, default=0, help="API calls to time after")
    args = parser.parse_args()
    run = {"herd": herd, "hold-lock": hold_lock, "token": token}[args.mode]
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
