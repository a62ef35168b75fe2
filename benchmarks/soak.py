"""Soak: many processes and threads, short-lived tokens, and an early expiry.

    python benchmarks/soak.py [--seconds 60] [--processes 8] [--threads 8]

8 processes x 8 threads call the fake eDRV as fast as they can for 60 s. Tokens
live 2 s, so they are renewed all the time, and half-way through the fake
expires every token at once (`expire all`). Callers must never see a failure
or a 401, and the token requests must stay close to the ideal: one per token
lifetime. Prints the figures, and exits 1 if a bound is missed.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from fake_edrv import FakeEdrv  # noqa: E402

from edrv_auth import EdrvAuth  # noqa: E402

#: Per-thread ceiling on requests, so the loop is bounded in count as well as time.
MAX_REQUESTS_PER_THREAD = 200_000


def worker(url: str, seconds: float, threads: int, margin: float, start: Any, results: Any) -> None:
    """One process: `threads` threads sharing one EdrvAuth, each looping on GET."""
    auth = EdrvAuth(refresh_margin=margin)
    counts = {"requests": 0, "failed": 0, "unauthorized": 0}
    lock = threading.Lock()
    start.wait()
    deadline = time.monotonic() + seconds

    def loop() -> None:
        made = failed = unauthorized = 0
        with requests.Session() as session:
            while time.monotonic() < deadline and made < MAX_REQUESTS_PER_THREAD:
                made += 1
                try:
                    status = session.get(url, auth=auth, timeout=10).status_code
                except Exception:  # noqa: BLE001 - a soak counts every failure
                    failed += 1
                    continue
                if status == 401:
                    unauthorized += 1
                elif status != 200:
                    failed += 1
        with lock:
            counts["requests"] += made
            counts["failed"] += failed
            counts["unauthorized"] += unauthorized

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    # ru_maxrss is in KiB on Linux.
    counts["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results.put(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--lifetime", type=float, default=2.0, help="token lifetime, s")
    parser.add_argument("--margin", type=float, default=0.5, help="refresh margin, s")
    args = parser.parse_args(argv)

    with FakeEdrv(expires_in=args.lifetime) as fake, tempfile.TemporaryDirectory() as cache:
        os.environ.update(fake.environment(cache))  # EDRV_CLIENT_ID, EDRV_TOKEN_URL...
        context = multiprocessing.get_context("spawn")
        start, results = context.Event(), context.Queue()
        url = f"{fake.url}/v1.1/chargestations"
        processes = [
            context.Process(
                target=worker,
                args=(url, args.seconds, args.threads, args.margin, start, results),
            )
            for _ in range(args.processes)
        ]
        for process in processes:
            process.start()
        time.sleep(1.0)  # let every child import and wait on the start event
        started = time.monotonic()
        start.set()
        time.sleep(args.seconds / 2)
        before_expiry = fake.token_requests
        fake.expire_all()
        per_process = [results.get(timeout=args.seconds + 60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        elapsed = time.monotonic() - started
        token_requests = fake.token_requests
        api_401s = fake.api_401s

    made = sum(p["requests"] for p in per_process)
    failed = sum(p["failed"] for p in per_process)
    unauthorized = sum(p["unauthorized"] for p in per_process)
    peak_mib = max(p["peak_kib"] for p in per_process) / 1024
    ideal = math.ceil(args.seconds / args.lifetime) + 1  # one per lifetime, plus the expiry
    usable = args.lifetime - min(args.margin, args.lifetime / 2)
    bound = math.ceil(args.seconds / usable) + 2  # renewals the margin implies, cold start, expiry

    rows = [
        ("processes x threads", f"{args.processes} x {args.threads}"),
        ("duration", f"{elapsed:.1f} s"),
        ("token lifetime / refresh margin", f"{args.lifetime:g} s / {args.margin:g} s"),
        ("requests made", f"{made} ({made / elapsed:.0f}/s)"),
        ("requests failed (must be 0)", str(failed)),
        ("401s seen by callers (must be 0)", str(unauthorized)),
        ("401s answered by the fake (retried)", str(api_401s)),
        ("token requests", f"{token_requests} ({before_expiry} before the expiry)"),
        ("ideal: one per token lifetime", str(ideal)),
        ("bound for this margin", str(bound)),
        ("peak memory per process", f"{peak_mib:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    missed = [
        name
        for name, ok in (
            ("failures", failed == 0),
            ("401s seen by callers", unauthorized == 0),
            ("token requests within bound", token_requests <= bound),
            ("every process reported", len(per_process) == args.processes),
        )
        if not ok
    ]
    print("PASS" if not missed else f"FAIL: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
