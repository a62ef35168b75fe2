"""One token request: what it costs once the SSL context (and client) are warm.

    python benchmarks/token_request.py [--json PATH]

The fake eDRV serves HTTPS on 127.0.0.1 with a certificate from a throwaway CA (``trustme``,
from the test extra), in this script's process. A child process imports the measured
``edrv_auth.py`` (``EDRV_BENCH_MODULE_DIR`` names another folder to measure, for before/after
comparisons), makes a few token requests unmeasured (the SSL context and anything else built
once per process), then times 20 more, each the whole POST of the form and its answer through
``_post``, the one seam the token endpoint calls. Figures: the median and the fastest and
slowest wall-clock milliseconds, and the median CPU milliseconds of the whole process (every
thread) per request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import MODULE_DIR, ROOT, arg_parser, fmt, machine, write_json
from fake_edrv import FakeEdrv
from transport_helpers import TestCA

WARM_UP = 3
MEASURED = 20
CHILD_TIMEOUT = 120.0

_CHILD = """
import json, statistics, sys, time, urllib.parse
sys.path.insert(0, sys.argv[1])
import edrv_auth
url, bundle = sys.argv[2], sys.argv[3]
form = edrv_auth._Secret(urllib.parse.urlencode({
    "grant_type": "client_credentials", "client_id": "test-client-id",
    "client_secret": "test-client-secret", "audience": "https://api.edrv.io",
}))
def one():
    answer = edrv_auth._post(url, form, 10.0, bundle)
    assert isinstance(answer, edrv_auth._Answer) and answer.status == 200, answer
for _ in range(int(sys.argv[4])):
    one()
wall, cpu = [], []
for _ in range(int(sys.argv[5])):
    started, used = time.perf_counter(), time.process_time()
    one()
    wall.append(1000 * (time.perf_counter() - started))
    cpu.append(1000 * (time.process_time() - used))
print(json.dumps({"module": edrv_auth.__file__, "wall_ms": wall, "cpu_ms": cpu}))
"""


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="edrv-bench-") as scratch:
        ca = TestCA(Path(scratch))
        with FakeEdrv(tls=ca.server_context()) as fake:
            command = [sys.executable, "-c", _CHILD, str(MODULE_DIR), fake.token_url]
            command += [str(ca.bundle), str(WARM_UP), str(MEASURED)]
            child = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT,
                check=False,
                cwd=ROOT,
            )
            requests_seen = fake.token_requests
    if child.returncode != 0:
        sys.exit(f"the measuring process failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout)
    wall, cpu = sorted(result["wall_ms"]), sorted(result["cpu_ms"])
    median_wall, median_cpu = wall[len(wall) // 2], cpu[len(cpu) // 2]
    print(f"edrv_auth: {result['module']}")
    print(
        f"one token request, SSL context warm: median {fmt(median_wall)} ms "
        f"(fastest {fmt(wall[0])}, slowest {fmt(wall[-1])}; {len(wall)} requests), "
        f"CPU {fmt(median_cpu)} ms"
    )
    assert requests_seen == WARM_UP + MEASURED, requests_seen
    write_json(
        args.json,
        {
            "benchmark": "token_request",
            "machine": machine(),
            "module": result["module"],
            "wall_ms": result["wall_ms"],
            "cpu_ms": result["cpu_ms"],
            "median_ms": median_wall,
            "median_cpu_ms": median_cpu,
        },
    )


if __name__ == "__main__":
    main()
