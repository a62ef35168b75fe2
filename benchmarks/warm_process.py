"""Warm new process: a valid token is on disk; how soon does a new process get its first 200?

    python benchmarks/warm_process.py [--json PATH]

Each run is a fresh ``python -c`` process, timed from inside: ``start`` is the script's
first statement (the interpreter's own start-up is the same for everyone and left out).
Spans, in milliseconds (medians over the runs, implementations interleaved):

- http lib: ``import requests`` (or ``httpx``), which every variant pays;
- auth import: importing the auth library (for edrv_auth: ``import edrv_auth``);
- auth setup: constructing the auth, plus for edrv_auth the first ``get_token()`` (read from
  the cache file); for the naive script, its token request;
- first GET: the first request, including any token work the auth does there;
- total: start -> first 200;
- extra vs static: median total minus the static header's median total (same library);
- token requests: token requests the fake received during the measured runs (edrv_auth
  must make none: the token on disk is valid).

The target is on edrv_auth's own work, "auth import + auth setup". Every implementation is
run once unmeasured first: it writes its token cache and Python's bytecode cache (kept in a
temporary ``PYTHONPYCACHEPREFIX``, so nothing is written in the repository).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    API_PATH,
    arg_parser,
    fake_edrv,
    finish,
    fmt,
    median,
    print_table,
    settings_for,
    target,
)
from _impls import REQUEST_TIMEOUT

#: Measured runs per implementation (static and edrv_auth with requests get the most).
RUNS = {
    "static/requests": 15,
    "edrv_auth/requests": 15,
    "static/httpx": 8,
    "edrv_auth/httpx": 8,
    "naive/requests": 5,
    "authlib/requests": 5,
    "requests-auth": 5,
}
RUN_TIMEOUT = 60.0
TOTAL_SECONDS = 150.0  # time bound of all runs together

_HEAD = """\
import time
_t0 = time.perf_counter()
import json, os, sys
import {lib}
_before = set(sys.modules)
_t1 = time.perf_counter()
"""
_TAIL = """\
_t3 = time.perf_counter()
_r = {get}
_t4 = time.perf_counter()
print(json.dumps({{
    "status": _r.status_code,
    "lib_ms": (_t1 - _t0) * 1e3,
    "import_ms": (_t2 - _t1) * 1e3,
    "setup_ms": (_t3 - _t2) * 1e3,
    "request_ms": (_t4 - _t3) * 1e3,
    "total_ms": (_t4 - _t0) * 1e3,
    "new_modules": sorted({{m.split(".")[0] for m in _imported - _before}}),
}}))
"""
_URL = "os.environ['EDRV_API_URL'] + " + repr(API_PATH)
_REQUESTS_GET = f"requests.Session().get({_URL}, timeout={REQUEST_TIMEOUT}, **_kw)"
_HTTPX_GET = f"httpx.Client(timeout={REQUEST_TIMEOUT}, **_kw).get({_URL})"
_STATIC = """\
_t2 = time.perf_counter()
_kw = {"headers": {"Authorization": "Bearer " + os.environ["BENCH_STATIC_TOKEN"]}}
"""
_EDRV = """\
import edrv_auth
_t2 = time.perf_counter()
_auth = edrv_auth.EdrvAuth()
_auth.get_token()
_kw = {"auth": _auth}
"""
_NAIVE = """\
_t2 = time.perf_counter()
_form = {
    "grant_type": "client_credentials",
    "client_id": os.environ["EDRV_CLIENT_ID"],
    "client_secret": os.environ["EDRV_CLIENT_SECRET"],
    "audience": os.environ["BENCH_AUDIENCE"],
}
_token = requests.post(os.environ["EDRV_TOKEN_URL"], data=_form, timeout=30).json()
_kw = {"headers": {"Authorization": "Bearer " + _token["access_token"]}}
"""
# The peers' snippets are self-contained (no benchmark module is imported, so that its
# import cost is not counted); they configure the peers exactly as ``_impls.py`` does.
_AUTHLIB = """\
from authlib.common.urls import add_params_to_qs
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.auth import encode_client_secret_post
_t2 = time.perf_counter()
def _encode(client, method, uri, headers, body):
    uri, headers, body = encode_client_secret_post(client, method, uri, headers, body)
    body = add_params_to_qs(body or "", [("audience", os.environ["BENCH_AUDIENCE"])])
    if "Content-Length" in headers:
        headers["Content-Length"] = str(len(body))
    return uri, headers, body
_session = OAuth2Session(
    os.environ["EDRV_CLIENT_ID"],
    os.environ["EDRV_CLIENT_SECRET"],
    token_endpoint_auth_method="edrv_form",
    token={"access_token": "none-yet", "token_type": "bearer", "expires_at": 0},
    token_endpoint=os.environ["EDRV_TOKEN_URL"],
    grant_type="client_credentials",
)
_session.register_client_auth_method(("edrv_form", _encode))
_kw = {"auth": _session.token_auth}
"""
_REQUESTS_AUTH = """\
import requests_auth
_t2 = time.perf_counter()
requests_auth.OAuth2.token_cache = requests_auth.JsonTokenFileCache(
    os.path.join(os.environ["EDRV_AUTH_CACHE_DIR"], "requests_auth_tokens.json")
)
_auth = requests_auth.OAuth2ClientCredentials(
    os.environ["EDRV_TOKEN_URL"],
    os.environ["EDRV_CLIENT_ID"],
    os.environ["EDRV_CLIENT_SECRET"],
    audience=os.environ["BENCH_AUDIENCE"],
)
if os.environ["BENCH_BASIC_SHIM"] == "1":
    _auth.session.auth = None
    _auth.data.update(
        client_id=os.environ["EDRV_CLIENT_ID"], client_secret=os.environ["EDRV_CLIENT_SECRET"]
    )
_kw = {"auth": _auth}
"""
SNIPPETS = {
    "static/requests": ("requests", _STATIC, _REQUESTS_GET, None),
    "edrv_auth/requests": ("requests", _EDRV, _REQUESTS_GET, None),
    "static/httpx": ("httpx", _STATIC, _HTTPX_GET, None),
    "edrv_auth/httpx": ("httpx", _EDRV, _HTTPX_GET, None),
    "naive/requests": ("requests", _NAIVE, _REQUESTS_GET, None),
    "authlib/requests": ("requests", _AUTHLIB, _REQUESTS_GET, "authlib"),
    "requests-auth": ("requests", _REQUESTS_AUTH, _REQUESTS_GET, "requests_auth"),
}


def script(name: str) -> str:
    """The ``python -c`` program for one implementation."""
    lib, setup, get, _ = SNIPPETS[name]
    # Which modules the auth's import brought in (the snapshot is taken in every variant).
    mark = "_t2 = time.perf_counter()\n"
    setup = setup.replace(mark, "_imported = set(sys.modules)\n" + mark)
    return _HEAD.format(lib=lib) + setup + _TAIL.format(get=get)


def run_one(fake: Any, name: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """One fresh process; its own timings, its wall time and its token requests."""
    before = fake.counts()["token_requests"]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script(name)],
        env=env,
        cwd=cwd,  # not the repository: "python -c" imports from its working folder first
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    wall = (time.perf_counter() - started) * 1e3
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result["process_ms"] = wall
    result["token_requests"] = fake.counts()["token_requests"] - before
    return result


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    from _common import peer_available

    notes: list[str] = []
    names = []
    for name, (_, _, _, peer) in SNIPPETS.items():
        if peer is not None and not peer_available(peer):
            notes.append(f"{name}: skipped, its peer library is not installed")
        else:
            names.append(name)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with fake_edrv() as (fake, scratch, shim):
        envs = {}
        for name in names:
            settings = settings_for(fake, scratch / name.replace("/", "_"), shim)
            envs[name] = settings.env({"PYTHONPYCACHEPREFIX": str(scratch / "pycache")})
            envs[name].pop("PYTHONDONTWRITEBYTECODE", None)
            run_one(fake, name, envs[name], scratch)  # unmeasured: token and bytecode caches
        schedule = [name for name in names for _ in range(RUNS[name])]
        random.Random(7).shuffle(schedule)
        deadline = time.monotonic() + TOTAL_SECONDS
        for name in schedule:
            if time.monotonic() > deadline:
                notes.append("time bound reached: fewer runs than planned")
                break
            runs[name].append(run_one(fake, name, envs[name], scratch))
    rows = []
    for name in names:
        mine = runs[name]
        row: dict[str, Any] = {"impl": name, "runs": len(mine)}
        for key in ("lib_ms", "import_ms", "setup_ms", "request_ms", "total_ms", "process_ms"):
            row[key] = median(r[key] for r in mine)
        row["auth_ms"] = median(r["import_ms"] + r["setup_ms"] for r in mine)
        row["token_requests"] = sum(r["token_requests"] for r in mine)
        row["non_200"] = sum(1 for r in mine if r["status"] != 200)
        row["new_modules"] = sorted({m for r in mine for m in r["new_modules"]})
        rows.append(row)
    by_name = {r["impl"]: r for r in rows}
    for row in rows:
        static = by_name.get(f"static/{SNIPPETS[row['impl']][0]}")
        row["extra_ms"] = (
            row["total_ms"] - static["total_ms"]
            if static and row["total_ms"] is not None and static["total_ms"] is not None
            else None
        )
    notes.append(
        "auth import + setup: edrv_auth's own work (import edrv_auth, EdrvAuth(), "
        "get_token() from the file)"
    )
    for row in rows:
        if row["impl"].startswith("edrv_auth/"):
            notes.append(
                f"{row['impl']}: modules first imported by the auth: "
                f"{', '.join(row['new_modules']) or 'none'}"
            )
    print_table(
        "Warm new process: token on disk, start -> first 200 (ms, medians)",
        [
            "implementation",
            "runs",
            "http lib",
            "auth import",
            "auth setup",
            "first GET",
            "total",
            "extra vs static",
            "token requests",
            "process",
        ],
        [
            [
                r["impl"],
                r["runs"],
                fmt(r["lib_ms"], 1),
                fmt(r["import_ms"], 2),
                fmt(r["setup_ms"], 2),
                fmt(r["request_ms"], 2),
                fmt(r["total_ms"], 1),
                fmt(r["extra_ms"], 2),
                r["token_requests"],
                fmt(r["process_ms"], 0),
            ]
            for r in rows
        ],
        [*notes, "process: the parent's view, spawn -> exit (interpreter start-up included)"],
    )
    checks = []
    for lib in ("requests", "httpx"):
        edrv = by_name.get(f"edrv_auth/{lib}")
        if edrv is None:
            continue
        checks += [
            target(f"warm new process token requests ({lib})", edrv["token_requests"], 0, "eq"),
            target(
                f"warm new process auth work: import + first get_token ({lib})",
                edrv["auth_ms"],
                1.0,
                "max",
                "ms",
            ),
        ]
    finish(args.json, "warm_process", checks, rows=rows, runs=runs, notes=notes)


if __name__ == "__main__":
    main()
