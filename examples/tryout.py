"""See edrv_auth work end to end on this machine, with no eDRV account.

    python examples/tryout.py

It starts the tests' fake eDRV on 127.0.0.1, then walks a token through its
life: several processes sharing one token, a new process reusing it, eDRV
expiring it early (the request is retried once, transparently), and a revoked
client whose token requests stay capped. Nothing leaves this machine, and the
cache lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from fake_edrv import FakeEdrv  # noqa: E402

from edrv_auth import EdrvAuth  # noqa: E402

PROCESSES = 4
THREADS = 3


def worker(barrier: Any, url: str, results: Any) -> None:
    """One process: a few threads, each with a request, all starting at once."""
    auth = EdrvAuth()  # everything comes from the EDRV_* variables set below
    statuses: list[int] = []
    barrier.wait()

    def call() -> None:
        with requests.Session() as session:
            statuses.append(session.get(url, auth=auth, timeout=10).status_code)

    threads = [threading.Thread(target=call) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(statuses)


def run_processes(count: int, url: str) -> list[int]:
    """Start `count` worker processes together; return every status they saw."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    processes = [context.Process(target=worker, args=(barrier, url, results)) for _ in range(count)]
    for process in processes:
        process.start()
    statuses = [status for _ in processes for status in results.get(timeout=60)]
    for process in processes:
        process.join()
    return statuses


def step(number: int, text: str) -> None:
    print(f"\n{number}. {text}")


def describe_cap(statuses: list[int], new: int, total: int) -> str:
    """Step 4's result in plain words: what the caller saw, and what the cap held back."""
    return (
        f"   the caller sees {sorted(set(statuses))}: each 401 comes back as eDRV sent it\n"
        f"   eDRV got {new} more token requests, {total} since the start, and no more: at most\n"
        "   5 a minute per credential set (client id and secret), counted across processes"
    )


def main() -> int:
    with FakeEdrv(expires_in=86400) as fake, tempfile.TemporaryDirectory() as cache:
        os.environ.update(fake.environment(cache))  # EDRV_CLIENT_ID, EDRV_TOKEN_URL...
        url = f"{fake.url}/v1.1/chargestations"
        print(f"fake eDRV on {fake.url}; token cache in {cache}")
        fake.token_delay = 0.3  # a slow token endpoint makes the processes really overlap

        step(1, f"{PROCESSES} processes x {THREADS} threads start together on a cold cache")
        statuses = run_processes(PROCESSES, url)
        print(f"   {len(statuses)} requests, statuses {sorted(set(statuses))}")
        print(f"   token requests: {fake.token_requests} (one token for everyone)")

        step(2, "a new process finds the token in the cache")
        before = fake.token_requests
        statuses = run_processes(1, url)
        print(f"   statuses {statuses}; token requests: {fake.token_requests - before}")

        step(3, "eDRV expires the token early: the next request gets 401 jwt expired")
        fake.expire_all()
        auth = EdrvAuth()
        before = fake.counts()
        response = requests.get(url, auth=auth, timeout=10)
        after = fake.counts()
        print(
            f"   the caller sees {response.status_code}; behind the scenes: "
            f"{after['api_401s'] - before['api_401s']} x 401, "
            f"{after['token_requests'] - before['token_requests']} token request, "
            f"{len(response.history)} retry"
        )

        step(4, "a revoked client: the API rejects every token; 30 requests follow")
        fake.reject_all = True
        fake.token_delay = 0.0
        before = fake.token_requests
        statuses = [requests.get(url, auth=auth, timeout=10).status_code for _ in range(30)]
        print(describe_cap(statuses, fake.token_requests - before, fake.token_requests))

        totals = fake.counts()
        print(
            f"\ntotals: token requests {totals['token_requests']}, "
            f"API calls {totals['api_requests']}, 401s answered {totals['api_401s']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
