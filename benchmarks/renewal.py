"""Renewal: the longest API call while a due token is renewed, against the same loop without.

    python benchmarks/renewal.py [--json PATH] [--seconds S]

A child process (requests and httpx: 4 threads; async: 20 httpx tasks) calls the fake eDRV
for a few seconds, twice. First with a fresh token in the cache: nothing to renew. Then with
a token past its refresh time that still has minutes to live, while the token endpoint takes
2 s to answer: the token is renewed once, in the background. Callers should not notice: the
longest call across the renewal should be the longest call without one, within noise, and
far below the 2 s that a caller waiting for the renewal would take.

``EDRV_BENCH_MODULE_DIR`` measures another ``edrv_auth.py`` (say, a release that renewed in
the caller's thread) for comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from _common import (
    Settings,
    arg_parser,
    fake_edrv,
    finish,
    fmt,
    print_table,
    settings_for,
    target,
)

import edrv_auth  # the measured module: _common puts its folder first on sys.path

#: How long the token endpoint takes to answer during the renewal run.
TOKEN_DELAY = 2.0
#: Seconds left on the due token: it outlives a renewal (timeout 10 s), past its refresh time.
DUE_LEFT = 200.0
CLIENTS = ("requests", "httpx", "async")

CHILD = r"""
import asyncio, json, os, sys, threading, time
import edrv_auth

client, seconds = sys.argv[1], float(sys.argv[2])
auth = edrv_auth.EdrvAuth()
url = os.environ["EDRV_API_URL"] + "/v1.1/chargestations"
latencies = []

def threads():
    import httpx, requests
    ends = time.monotonic() + seconds

    def loop():
        if client == "httpx":
            with httpx.Client(auth=auth) as session:
                while time.monotonic() < ends:
                    began = time.monotonic()
                    session.get(url).raise_for_status()
                    latencies.append(time.monotonic() - began)
        else:
            with requests.Session() as session:
                while time.monotonic() < ends:
                    began = time.monotonic()
                    session.get(url, auth=auth, timeout=30).raise_for_status()
                    latencies.append(time.monotonic() - began)

    pool = [threading.Thread(target=loop) for _ in range(4)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

async def tasks():
    import httpx
    ends = time.monotonic() + seconds
    async with httpx.AsyncClient(auth=auth) as session:
        async def loop():
            while time.monotonic() < ends:
                began = time.monotonic()
                (await session.get(url)).raise_for_status()
                latencies.append(time.monotonic() - began)
        await asyncio.gather(*(loop() for _ in range(20)))

if client == "async":
    asyncio.run(tasks())
else:
    threads()
print(json.dumps({"calls": len(latencies), "longest": max(latencies)}), flush=True)
"""


def plant(settings: Settings, fake: Any, left: float) -> None:
    """Cache a token, valid at the fake for an hour, that says it expires in ``left`` s."""
    auth = edrv_auth.EdrvAuth(
        settings.client_id,
        settings.client_secret,
        token_url=settings.token_url,
        api_url=settings.api_url,
        cache_dir=settings.cache_dir,
    )
    now = time.time()
    token = edrv_auth._Token(
        edrv_auth._Secret(fake.issue_token(3600)), now + left - 3600, now + left
    )
    auth._describe().file_cache.write(edrv_auth._CacheRecord(token))


def run(env: dict[str, str], client: str, seconds: float) -> dict[str, Any]:
    """Run the child loop; ``-c`` puts the working folder first on ``sys.path``, so it runs in
    the cache folder, where no other ``edrv_auth.py`` can shadow the measured one."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, client, str(seconds)],
        cwd=env["EDRV_AUTH_CACHE_DIR"],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the {client} child failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each loop")
    args = parser.parse_args()
    rows, checks, runs = [], [], {}
    with fake_edrv() as (fake, scratch, shim):
        for client in CLIENTS:
            settings = settings_for(fake, scratch / client, shim)
            env = settings.env()
            fake.token_delay = 0.0
            plant(settings, fake, left=3600.0)  # fresh: nothing to renew
            before = fake.token_requests
            quiet = run(env, client, args.seconds)
            quiet_requests = fake.token_requests - before
            fake.token_delay = TOKEN_DELAY
            plant(settings, fake, left=DUE_LEFT)  # due: renewed once, slowly
            before = fake.token_requests
            renewing = run(env, client, args.seconds)
            renewals = fake.token_requests - before
            runs[client] = {"quiet": quiet, "renewal": renewing, "token_requests": renewals}
            rows.append(
                [
                    client,
                    quiet["calls"],
                    fmt(quiet["longest"] * 1000, 1),
                    renewing["calls"],
                    fmt(renewing["longest"] * 1000, 1),
                    f"{quiet_requests} / {renewals}",
                ]
            )
            checks.append(
                target(
                    f"{client}: longest call across a {TOKEN_DELAY:g} s renewal",
                    renewing["longest"] * 1000,
                    max(quiet["longest"] * 1000 * 3, quiet["longest"] * 1000 + 100),
                    "max",
                    "ms",
                )
            )
            checks.append(target(f"{client}: token requests for the renewal", renewals, 1, "eq"))
    print_table(
        f"Longest API call, {args.seconds:g} s of calls each (ms)",
        [
            "client",
            "calls, no renewal",
            "longest, no renewal",
            "calls, renewal",
            "longest, renewal",
            "token requests",
        ],
        rows,
        [
            f"the renewal run starts with a token {DUE_LEFT:g} s from expiry, past its refresh "
            f"time, while the token endpoint takes {TOKEN_DELAY:g} s to answer",
            "target: the longest call across the renewal is at most 3x (or 100 ms more than) "
            "the longest call without one",
        ],
    )
    finish(args.json, "renewal", checks, rows=rows, runs=runs)


if __name__ == "__main__":
    main()
