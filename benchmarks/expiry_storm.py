"""Expiry storm: clients request for 3 s; half-way, eDRV expires every token at once.

    python benchmarks/expiry_storm.py [--json PATH]

Two shapes: 32 threads in one process, and 8 processes x 4 threads sharing one cache. Every
process first makes one GET per thread (a warm token and warm connections), then all start
together; at 1.5 s the fake invalidates every token it issued (``expire_all``); at 3 s they
stop. The token endpoint takes 0.2 s to answer. Per implementation and shape:

- token requests after expiry: token requests the fake received after ``expire_all``
  (the minimum is 1);
- 401s to callers: responses with status 401 returned to the benchmark code, over the whole
  run (must be 0); in brackets, the 401s the fake sent after the expiry (an adapter that
  retries once absorbs those);
- failures: exceptions raised to callers and statuses other than 200/401 (must be 0);
- recovery: seconds from ``expire_all`` to the first 200 answering a request sent after it
  ("never" if no such request succeeded);
- 200s: successful GETs in the 3 s (throughput, for scale).
"""

from __future__ import annotations

import json
import time
from typing import Any

from _common import (
    BENCH_DIR,
    arg_parser,
    collect,
    fake_edrv,
    finish,
    fmt,
    go,
    kill,
    print_table,
    settings_for,
    shim_notes,
    spawn,
    target,
    wait_ready,
)
from _impls import TOKEN_FETCHERS, installed

SECONDS = 3.0
EXPIRE_AT = 1.5
MAX_REQUESTS = 100_000  # per thread; the 3 s bound ends the loop long before
TOKEN_DELAY = 0.2
SHAPES = {"threads": (1, 32), "processes": (8, 4)}
IMPLS = TOKEN_FETCHERS


def storm(
    fake: Any, env: dict[str, str], name: str, processes: int, threads: int
) -> dict[str, Any]:
    """One run: start the children, expire every token half-way, collect and summarize."""
    config = {
        "impl": name,
        "threads": threads,
        "requests": MAX_REQUESTS,
        "seconds": SECONDS,
        "warmup": True,
        "record": True,
    }
    args = [str(BENCH_DIR / "_worker.py"), json.dumps(config)]
    children = [spawn(args, env, f"{name} #{i}") for i in range(processes)]
    try:
        wait_ready(children, 90)
        started = go(children)
        time.sleep(max(started + EXPIRE_AT - time.monotonic(), 0))
        fake.expire_all()
        expired = time.monotonic()
        at_expiry = fake.counts()
        results = collect(children, SECONDS + 90)
    finally:
        kill(children)
    end = fake.counts()
    records = [tuple(r) for result in results for r in result["records"]]
    after = [r for r in records if r[0] >= expired]
    recovered = [end_ for sent, end_, status in after if status == 200]
    caller_401s = sum(1 for r in records if r[2] == 401)
    failures = sum(1 for r in records if r[2] not in (200, 401))
    errors = sorted({e for result in results for e in result["errors"]})
    return {
        "impl": name,
        "processes": processes,
        "threads": threads,
        "token_requests_after_expiry": end["token_requests"] - at_expiry["token_requests"],
        "caller_401s": caller_401s,
        "caller_401s_after_expiry": sum(1 for r in after if r[2] == 401),
        "api_401s_after_expiry": end["api_401s"] - at_expiry["api_401s"],
        "failures": failures,
        "recovery_s": (min(recovered) - expired) if recovered else None,
        "ok": sum(1 for r in records if r[2] == 200),
        "errors": errors[:5],
    }


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with fake_edrv(token_delay=TOKEN_DELAY) as (fake, scratch, shim):
        names = installed(IMPLS, notes)
        for shape, (processes, threads) in SHAPES.items():
            for name in names:
                folder = scratch / f"{shape}-{name.replace('/', '_')}"
                env = settings_for(fake, folder, shim).env()
                row = storm(fake, env, name, processes, threads)
                row["shape"] = shape
                rows.append(row)
    notes += shim_notes(shim, [r["impl"] for r in rows])
    notes.append(
        f"expire_all at {EXPIRE_AT} s of {SECONDS} s; token endpoint answers in {TOKEN_DELAY} s"
    )
    for shape, (processes, threads) in SHAPES.items():
        print_table(
            f"Expiry storm, {shape}: {processes} process(es) x {threads} threads, {SECONDS:g} s",
            [
                "implementation",
                "token req. after expiry",
                "401s callers (sent after)",
                "failures",
                "recovery s",
                "200s",
            ],
            [
                [
                    r["impl"],
                    r["token_requests_after_expiry"],
                    f"{r['caller_401s']} ({r['api_401s_after_expiry']})",
                    r["failures"],
                    "never" if r["recovery_s"] is None else fmt(r["recovery_s"], 3),
                    r["ok"],
                ]
                for r in rows
                if r["shape"] == shape
            ],
            notes if shape == "processes" else (),
        )
    for row in rows:
        for error in row["errors"]:
            print(f"  ! {row['impl']} ({row['shape']}): {error}")
    checks = []
    for row in rows:
        if row["impl"].startswith("edrv_auth/"):
            label = f"{row['shape']}, {row['impl']}"
            checks += [
                target(
                    f"expiry storm token requests after expiry ({label})",
                    row["token_requests_after_expiry"],
                    1,
                    "eq",
                ),
                target(f"expiry storm 401s seen by callers ({label})", row["caller_401s"], 0, "eq"),
                target(f"expiry storm failures ({label})", row["failures"], 0, "eq"),
            ]
    finish(args.json, "expiry_storm", checks, rows=rows, notes=notes)


if __name__ == "__main__":
    main()
