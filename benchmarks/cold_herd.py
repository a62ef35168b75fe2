"""Cold herd: 8 processes x 4 threads start together on a cold cache, 25 GETs per thread.

    python benchmarks/cold_herd.py [--json PATH]

Per implementation, in a fresh cache folder, with a token endpoint that takes 0.2 s to
answer (a remote OAuth server; it makes the processes' first requests overlap):

- token requests: token requests the fake received (the minimum is 1; static needs none);
- 401s: responses with status 401 returned to the benchmark code ("callers"), and in
  brackets the 401s the fake sent in all (an adapter that retries hides some from callers);
- failures: exceptions raised to the callers plus statuses other than 200 and 401;
- wall: seconds from "go" (all processes ready: imported, configured, connected) to the
  last result.
"""

from __future__ import annotations

import json
from typing import Any

from _common import (
    BENCH_DIR,
    arg_parser,
    fake_edrv,
    finish,
    fmt,
    print_table,
    run_children,
    settings_for,
    shim_notes,
    target,
)
from _impls import TOKEN_FETCHERS, installed

PROCESSES = 8
THREADS = 4
REQUESTS = 25
SECONDS = 30.0  # per-thread time bound; a healthy run takes well under a second
TOKEN_DELAY = 0.2
IMPLS = ["static/requests", *TOKEN_FETCHERS]


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    """Add up the statuses and errors of every child."""
    ok = caller_401s = failures = 0
    for result in results:
        for status, count in result["statuses"].items():
            if status == "200":
                ok += count
            elif status == "401":
                caller_401s += count
            elif status != "-1":
                failures += count
        failures += sum(result["errors"].values())
    return {"ok": ok, "caller_401s": caller_401s, "failures": failures}


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with fake_edrv(token_delay=TOKEN_DELAY) as (fake, scratch, shim):
        for name in installed(IMPLS, notes):
            settings = settings_for(fake, scratch / name.replace("/", "_"), shim)
            config = {
                "impl": name,
                "threads": THREADS,
                "requests": REQUESTS,
                "seconds": SECONDS,
            }
            worker = [str(BENCH_DIR / "_worker.py"), json.dumps(config)]
            before = fake.counts()
            started, finished, results = run_children(
                [(worker, f"{name} #{i}") for i in range(PROCESSES)],
                settings.env(),
                run_timeout=SECONDS + 60,
            )
            after = fake.counts()
            row = {
                "impl": name,
                "token_requests": after["token_requests"] - before["token_requests"],
                "api_401s": after["api_401s"] - before["api_401s"],
                "wall_s": finished - started,
                "slowest_s": max(r["slowest"] for r in results),
                **summarize(results),
                "errors": sorted({e for r in results for e in r["errors"]})[:5],
            }
            rows.append(row)
    notes += shim_notes(shim, [r["impl"] for r in rows])
    notes.append(
        f"token endpoint answers in {TOKEN_DELAY} s; wall = go -> last result; "
        "the slowest GET includes its token work"
    )
    print_table(
        f"Cold herd: {PROCESSES} processes x {THREADS} threads x {REQUESTS} GETs, cold cache",
        [
            "implementation",
            "token requests",
            "200s",
            "401s callers (sent)",
            "failures",
            "wall s",
            "slowest GET s",
        ],
        [
            [
                r["impl"],
                r["token_requests"],
                r["ok"],
                f"{r['caller_401s']} ({r['api_401s']})",
                r["failures"],
                fmt(r["wall_s"]),
                fmt(r["slowest_s"]),
            ]
            for r in rows
        ],
        notes,
    )
    for row in rows:
        for error in row["errors"]:
            print(f"  ! {row['impl']}: {error}")
    edrv = [r for r in rows if r["impl"].startswith("edrv_auth/")]
    checks = [
        target(f"cold herd 8x4 token requests ({r['impl']})", r["token_requests"], 1, "eq")
        for r in edrv
    ]
    checks += [
        target(
            f"cold herd 8x4 401s + failures ({r['impl']})",
            r["caller_401s"] + r["failures"],
            0,
            "eq",
        )
        for r in edrv
    ]
    finish(args.json, "cold_herd", checks, rows=rows, notes=notes)


if __name__ == "__main__":
    main()
