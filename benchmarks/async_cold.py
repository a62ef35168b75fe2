"""Async cold start: 200 concurrent httpx.AsyncClient tasks, cold cache, slow token endpoint.

    python benchmarks/async_cold.py [--json PATH]

Each run is a fresh process with an empty cache; the token endpoint takes 0.5 s to answer.
The process builds the implementation's client and warms it with one request that skips
its auth (``auth=None``; ``withhold_token=True`` for authlib), so that httpx's own first-use
costs are not blamed on anyone and the token cache stays cold. Then it starts a heartbeat
task that sleeps 10 ms in a loop, launches 200 GET tasks at once and waits for them all.
Figures per implementation (runs interleaved, fresh processes):

- token requests: token requests the fake received in a run (edrv_auth must make exactly 1;
  "a, b, c" lists the runs when they differ);
- heartbeat max gap: the longest time between two heartbeat wake-ups (10 ms when the event
  loop is never blocked), median over runs, and in brackets the worst run;
- max gap before 1st answer: the same, counting only the gaps that end between the launch
  and the first answer (the launch, and the wait for the token where there is one), median
  over runs;
- 200s / failures: responses with status 200, and exceptions or other statuses, in all runs;
- 1st answer, wall: seconds from launching the 200 tasks to the first and to the last
  answer (medians).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

from _common import (
    ROOT,
    arg_parser,
    bounded,
    fake_edrv,
    finish,
    fmt,
    median,
    print_table,
    settings_for,
    shim_notes,
    target,
)

TASKS = 200
TOKEN_DELAY = 0.5
HEARTBEAT = 0.010
RUNS = 3  # per implementation
RUN_TIMEOUT = 60.0
TOTAL_SECONDS = 150.0  # time bound of all runs together
IMPLS = {  # name -> the peer library it needs
    "static/httpx": None,
    "edrv_auth/httpx": None,
    "naive/httpx": None,
    "authlib/httpx": "authlib",
    "httpx-auth": "httpx_auth",
}


# ---- Child ---------------------------------------------------------------------


async def measure(name: str) -> dict[str, Any]:
    """Warm httpx up, then time 200 cold tasks next to a 10 ms heartbeat."""
    import httpx
    from _common import Settings
    from _impls import REQUEST_TIMEOUT

    settings = Settings.from_env()
    headers: dict[str, str] = {}
    prepare = None
    if name == "static/httpx":
        client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT, headers={"Authorization": f"Bearer {settings.static_token}"}
        )
    elif name == "edrv_auth/httpx":
        import edrv_auth

        client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, auth=edrv_auth.EdrvAuth())
    elif name == "naive/httpx":
        client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT)

        async def fetch_once() -> None:
            form = {
                "grant_type": "client_credentials",
                "client_id": settings.client_id,
                "client_secret": settings.client_secret,
                "audience": settings.audience,
            }
            response = await client.post(settings.token_url, data=form)
            response.raise_for_status()
            headers["Authorization"] = f"Bearer {response.json()['access_token']}"

        prepare = fetch_once
    elif name == "authlib/httpx":
        import warnings

        from _impls import authlib_form_auth, authlib_options

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "use httpx2": a deprecation notice
            from authlib.integrations.httpx_client import AsyncOAuth2Client

        client = AsyncOAuth2Client(**authlib_options(settings), timeout=REQUEST_TIMEOUT)
        client.register_client_auth_method(authlib_form_auth(settings.audience))
    else:
        from _impls import httpx_auth_peer

        client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, auth=httpx_auth_peer(settings))

    beats: list[tuple[float, float]] = []  # (end of the gap, its length)
    answered: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        for _ in bounded(100_000, RUN_TIMEOUT):
            if stop.is_set():
                return
            await asyncio.sleep(HEARTBEAT)
            now = time.perf_counter()
            beats.append((now, now - last))
            last = now

    async def one() -> int:
        response = await client.get(settings.url, headers=headers)
        answered.append(time.perf_counter())
        return int(response.status_code)

    async with client:
        # Warm the client itself, without auth and so without a token: the first request on
        # a fresh httpx client is far slower when 200 tasks make it at once (static too).
        warm_up = settings.api_url + "/warm-up"  # a 404
        if name == "authlib/httpx":
            await client.request("GET", warm_up, withhold_token=True)  # type: ignore[call-arg]
        else:
            await client.get(warm_up, auth=None)
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(5 * HEARTBEAT)  # a few quiet beats first
        started = time.perf_counter()
        if prepare is not None:
            await prepare()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(TASKS)), return_exceptions=True),
            RUN_TIMEOUT,
        )
        wall = time.perf_counter() - started
        stop.set()
        await beat
    first = min(answered) if answered else started + wall
    gaps = [gap for _, gap in beats]
    waiting = [gap for end, gap in beats if started < end <= first]
    statuses = [o for o in outcomes if isinstance(o, int)]
    errors = sorted(
        {f"{type(o).__name__}: {str(o)[:120]}" for o in outcomes if not isinstance(o, int)}
    )
    return {
        "ok": statuses.count(200),
        "failures": len(outcomes) - statuses.count(200),
        "errors": errors[:5],
        "max_gap_ms": max(gaps) * 1e3 if gaps else None,
        "wait_gap_ms": max(waiting) * 1e3 if waiting else None,
        "beats": len(gaps),
        "first_s": first - started,
        "wall_s": wall,
    }


# ---- Parent --------------------------------------------------------------------


def run_one(fake: Any, name: str, env: dict[str, str]) -> dict[str, Any]:
    """One fresh child process; its figures plus the token requests the fake saw."""
    before = fake.counts()["token_requests"]
    done = subprocess.run(
        [sys.executable, __file__, "--worker", name],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=RUN_TIMEOUT + 30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result["token_requests"] = fake.counts()["token_requests"] - before
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(asyncio.run(measure(sys.argv[2]))), flush=True)
        return
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    from _common import peer_available

    notes: list[str] = []
    names = []
    for name, peer in IMPLS.items():
        if peer is not None and not peer_available(peer):
            notes.append(f"{name}: skipped, its peer library is not installed")
        else:
            names.append(name)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with fake_edrv(token_delay=TOKEN_DELAY) as (fake, scratch, shim):
        schedule = [(name, index) for index in range(RUNS) for name in names]
        random.Random(11).shuffle(schedule)
        deadline = time.monotonic() + TOTAL_SECONDS
        for name, index in schedule:
            if time.monotonic() > deadline:
                notes.append("time bound reached: fewer runs than planned")
                break
            folder = scratch / f"{name.replace('/', '_')}-{index}"  # a cold cache every run
            env = settings_for(fake, folder, shim).env()
            runs[name].append(run_one(fake, name, env))
    rows = []
    for name in names:
        mine = runs[name]
        tokens = [r["token_requests"] for r in mine]
        gaps = [r["max_gap_ms"] for r in mine if r["max_gap_ms"] is not None]
        rows.append(
            {
                "impl": name,
                "runs": len(mine),
                "token_requests": tokens,
                "max_gap_ms": median(gaps),
                "worst_gap_ms": max(gaps) if gaps else None,
                "wait_gap_ms": median(
                    r["wait_gap_ms"] for r in mine if r["wait_gap_ms"] is not None
                ),
                "first_s": median(r["first_s"] for r in mine),
                "ok": sum(r["ok"] for r in mine),
                "failures": sum(r["failures"] for r in mine),
                "wall_s": median(r["wall_s"] for r in mine),
                "errors": sorted({e for r in mine for e in r["errors"]})[:5],
            }
        )
    notes += shim_notes(shim, names)
    notes.append(
        f"{TASKS} tasks, token endpoint answers in {TOKEN_DELAY} s, heartbeat every "
        f"{HEARTBEAT * 1e3:.0f} ms, {RUNS} runs each; naive fetches once before the tasks"
    )
    print_table(
        f"Async cold start: {TASKS} concurrent AsyncClient tasks, cold cache",
        [
            "implementation",
            "runs",
            "token requests",
            "heartbeat max gap ms",
            "max gap before 1st answer ms",
            "200s",
            "failures",
            "1st answer s",
            "wall s",
        ],
        [
            [
                r["impl"],
                r["runs"],
                str(r["token_requests"][0])
                if len(set(r["token_requests"])) == 1
                else ", ".join(map(str, r["token_requests"])),
                f"{fmt(r['max_gap_ms'], 1)} ({fmt(r['worst_gap_ms'], 1)})",
                fmt(r["wait_gap_ms"], 1),
                r["ok"],
                r["failures"],
                fmt(r["first_s"], 2),
                fmt(r["wall_s"], 2),
            ]
            for r in rows
        ],
        notes,
    )
    for row in rows:
        for error in row["errors"]:
            print(f"  ! {row['impl']}: {error}")
    edrv = next((r for r in rows if r["impl"] == "edrv_auth/httpx"), None)
    checks = [
        target(
            "async cold 200 tasks token requests (every run)",
            None
            if edrv is None
            else max(edrv["token_requests"])
            if len(set(edrv["token_requests"])) == 1
            else -1,
            1,
            "eq",
        ),
        target(
            "async cold heartbeat max gap (median of runs)",
            None if edrv is None else edrv["max_gap_ms"],
            15.0,
            "max",
            "ms",
        ),
        target("async cold failures", None if edrv is None else edrv["failures"], 0, "eq"),
    ]
    finish(args.json, "async_cold", checks, rows=rows, runs=runs, notes=notes)


if __name__ == "__main__":
    main()
