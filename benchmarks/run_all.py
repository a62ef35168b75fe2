"""Run the whole benchmark suite and check every target.

    python benchmarks/run_all.py [--json PATH] [--only NAME ...]

Each benchmark runs in its own process and prints its tables; at the end comes one
PASS/FAIL line per target. The exit status is 1 if a target is missed or a benchmark
fails, 0 otherwise. ``--json`` writes every benchmark's results into one file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import describe_target, machine  # noqa: E402

BENCHMARKS = ["hot_path", "cold_herd", "expiry_storm", "warm_process", "async_cold", "renewal"]
#: Longest one benchmark may run before it counts as failed.
TIMEOUT = 600.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON here")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args()
    names = args.only or BENCHMARKS
    results: dict[str, Any] = {"machine": machine(), "benchmarks": {}}
    failed: list[str] = []
    started = time.monotonic()
    print(f"edrv_auth benchmarks; load average at start: {results['machine']['load_average']}")
    with tempfile.TemporaryDirectory(prefix="edrv-bench-results-") as folder:
        for name in names:
            out = Path(folder) / f"{name}.json"
            print(f"\n# {name}", flush=True)
            began = time.monotonic()
            try:
                done = subprocess.run(
                    [sys.executable, str(HERE / f"{name}.py"), "--json", str(out)],
                    timeout=TIMEOUT,
                    check=False,
                )
                status = done.returncode
            except subprocess.TimeoutExpired:
                status = None
            print(f"({name}: {time.monotonic() - began:.0f} s)", flush=True)
            if status != 0 or not out.exists():
                failed.append(f"{name} did not complete (exit status {status})")
                continue
            results["benchmarks"][name] = json.loads(out.read_text())
    print(f"\n# Targets ({time.monotonic() - started:.0f} s in all)\n")
    checks = [c for data in results["benchmarks"].values() for c in data.get("targets", [])]
    for check in checks:
        print(describe_target(check))
    for problem in failed:
        print(f"FAIL  {problem}")
    missed = sum(1 for c in checks if not c["passed"]) + len(failed)
    print(f"\n{len(checks) + len(failed) - missed} passed, {missed} failed")
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
