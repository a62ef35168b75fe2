"""A fleet without a shared disk: processes that share only a Redis URL.

    python benchmarks/redis_fleet.py [--processes 8] [--threads 4] [--requests 25]

Each process gets its own cache folder, as separate machines or fresh
containers would, and all of them share one `redis-server` started on
127.0.0.1. On a cold start they must make exactly one token request between
them; then the fake expires the token and they must make exactly one more.
Prints a table and exits 1 if a bound is missed. Needs `redis-server` and the
`redis` extra (`pip install -e '.[redis]'`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_edrv import FakeEdrv  # noqa: E402
from redis_server import RedisServer  # noqa: E402

CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import requests
    import edrv_auth
    go, ready = Path(sys.argv[1]), Path(sys.argv[2])
    threads, count = int(sys.argv[3]), int(sys.argv[4])
    auth = edrv_auth.EdrvAuth()
    url = os.environ["EDRV_API_URL"] + "/v1.1/chargestations"
    ready.touch()
    results = []
    def run(phase):
        while not Path(f"{go}-{phase}").exists():
            time.sleep(0.002)
        statuses = []
        def call():
            with requests.Session() as session:
                for _ in range(count):
                    statuses.append(session.get(url, auth=auth, timeout=30).status_code)
        pool = [threading.Thread(target=call) for _ in range(threads)]
        for t in pool: t.start()
        for t in pool: t.join()
        Path(f"{ready}-{phase}").touch()
        results.append(f"{sum(s == 200 for s in statuses)}/{sum(s == 401 for s in statuses)}")
    run("cold")
    run("expired")
    print(" ".join(results))
    """
)


def wait_for(paths: list[Path], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet did not answer in time")
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="per thread and phase")
    args = parser.parse_args(argv)

    with (
        RedisServer() as redis,
        FakeEdrv() as fake,
        tempfile.TemporaryDirectory() as work,
    ):
        fake.token_delay = 0.2  # a realistic token endpoint, so the cold start overlaps
        go, folder = Path(work) / "go", Path(work)
        children = []
        for i in range(args.processes):
            env = dict(
                os.environ,
                **fake.environment(folder / f"machine-{i}"),
                EDRV_AUTH_REDIS_URL=redis.url,
            )
            command = [sys.executable, "-c", CHILD, str(go), str(folder / f"ready-{i}")]
            command += [str(args.threads), str(args.requests)]
            children.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            )
        try:
            wait_for([folder / f"ready-{i}" for i in range(args.processes)])
            started = time.monotonic()
            Path(f"{go}-cold").touch()
            wait_for([folder / f"ready-{i}-cold" for i in range(args.processes)])
            cold_seconds, cold_tokens = time.monotonic() - started, fake.token_requests
            fake.expire_all()
            started = time.monotonic()
            Path(f"{go}-expired").touch()
            wait_for([folder / f"ready-{i}-expired" for i in range(args.processes)])
            expired_seconds = time.monotonic() - started
            outputs = [child.communicate(timeout=60)[0].split() for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        expired_tokens = fake.token_requests - cold_tokens
        disks = sum(1 for path in folder.glob("machine-*") if any(path.glob("*.json")))

    total = args.processes * args.threads * args.requests
    ok = [sum(int(out[phase].split("/")[0]) for out in outputs) for phase in (0, 1)]
    unauthorized = [sum(int(out[phase].split("/")[1]) for out in outputs) for phase in (0, 1)]
    rows = [
        ("fleet", f"{args.processes} processes x {args.threads} threads, one cache folder each"),
        ("cold start: token requests (must be 1)", str(cold_tokens)),
        ("cold start: 200s / 401s seen by callers", f"{ok[0]}/{total} / {unauthorized[0]}"),
        ("cold start: wall time", f"{cold_seconds:.2f} s"),
        ("after expiry: token requests (must be 1)", str(expired_tokens)),
        ("after expiry: 200s / 401s seen by callers", f"{ok[1]}/{total} / {unauthorized[1]}"),
        ("after expiry: wall time", f"{expired_seconds:.2f} s"),
        ("cache folders written", f"{disks} of {args.processes} (Redis serves them all)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    passed = cold_tokens == 1 and expired_tokens == 1 and ok == [total, total]
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
