"""Child process of the cold herd and expiry storm: threads making GETs, started together.

    python benchmarks/_worker.py '{"impl": "edrv_auth/requests", "threads": 4, ...}'

Protocol: it sets everything up (imports, the auth object, one keep-alive session or client
per thread, and with ``warmup`` one GET per thread), prints ``READY``, waits for ``GO`` on
stdin, runs, and prints one JSON line. Each thread makes at most ``requests`` GETs and stops
``seconds`` after "go", whichever comes first. Times are ``time.monotonic()`` (one clock for
every process on the machine), so the parent can relate them to its own events.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from typing import Any

from _common import Settings, bounded
from _impls import IMPLS, Getter


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    impl = IMPLS[config["impl"]](Settings.from_env())
    threads: int = config["threads"]
    seconds: float = config["seconds"]
    record: bool = config.get("record", False)
    getters: list[Getter] = [impl.getter() for _ in range(threads)]
    if config.get("warmup"):
        impl.start()
        for get in getters:
            get()
    go = threading.Event()
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    records: list[tuple[float, float, int]] = []
    started_at = [0.0]
    slowest = [0.0]

    def run(get: Getter) -> None:
        go.wait(seconds + 60)
        mine: list[tuple[float, float, int]] = []
        seen: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        left = max(started_at[0] + seconds - time.monotonic(), 0.0)
        for _ in bounded(config["requests"], left):
            sent = time.monotonic()
            try:
                status = get()
            except Exception as exc:  # noqa: BLE001 - a failure to count, with its kind
                status = -1
                failed[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            mine.append((sent, time.monotonic(), status))
            seen[str(status)] += 1
        with lock:
            slowest[0] = max([slowest[0], *(end - begin for begin, end, _ in mine)])
            statuses.update(seen)
            errors.update(failed)
            if record:
                records.extend(mine)

    workers = [threading.Thread(target=run, args=(get,)) for get in getters]
    for worker in workers:
        worker.start()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("expected GO")
    started_at[0] = time.monotonic()
    try:
        impl.start()
    except Exception as exc:  # noqa: BLE001 - counted: every thread's requests fail
        errors[f"start: {type(exc).__name__}: {str(exc)[:120]}"] += 1
    go.set()
    for worker in workers:
        worker.join(seconds + 120)
    finished = time.monotonic()
    impl.close()
    result = {
        "statuses": dict(statuses),
        "errors": dict(errors),
        "started": started_at[0],
        "finished": finished,
        "records": records,
        "slowest": slowest[0],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
