"""A loopback fake of the eDRV API, for the tests, the benchmarks and the offline demo.

It is a real threaded HTTP/1.1 socket server rather than a mock of ``requests`` or ``httpx``,
because the code under test plugs into both libraries' auth hooks, connection pools, redirects
and streamed bodies, and only a real server exercises all of that honestly. It uses the stdlib
only, so it runs wherever the package does.

Run it by hand with ``python tests/fake_edrv.py [--port N] [--expires-in S]``: it prints the
variables that point edrv_auth at it, for client credentials or for an API key.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import secrets
import shlex
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlsplit

# Refuse absurd bodies instead of trying to hold them in memory.
MAX_BODY = 64 * 1024 * 1024


#: The variables that would route an HTTP client's requests to the fake through a proxy:
#: the tests and the benchmarks clear them.
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)


class BadRequest(Exception):
    """Malformed framing or content; answered with a 400 JSON instead of a crashed thread."""


class _Canned(NamedTuple):
    """A queued fault-injection response (or a connection drop) for exactly one request."""

    status: int
    body: bytes
    headers: dict[str, str]
    delay: float = 0.0
    drop: bool = False


def _make_canned(
    status: int, body: bytes | str | dict[str, Any], headers: dict[str, str] | None, delay: float
) -> _Canned:
    if not 200 <= status <= 599:
        raise ValueError(f"status must be 200..599, got {status}")
    headers = dict(headers or {})
    if isinstance(body, dict):
        data, content_type = json.dumps(body).encode(), "application/json"
    elif isinstance(body, str):
        data, content_type = body.encode(), "text/html; charset=utf-8"
    else:
        data, content_type = bytes(body), "application/octet-stream"
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = content_type
    return _Canned(status, data, headers, delay)


def _parse_token_request(body: bytes, content_type: str) -> dict[str, str]:
    """Parse a token request body: a form, as eDRV's clients send, or JSON, which it also takes."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise BadRequest("JSON body must be an object of strings")
        return {str(key): str(value) for key, value in data.items()}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except ValueError:
        raise BadRequest("malformed form body") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise BadRequest("duplicate form field")
    return form


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """Client credentials sent as HTTP Basic auth (RFC 6749 section 2.3.1), if any."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("malformed Basic credentials") from None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon:
        raise BadRequest("malformed Basic credentials")
    # RFC 6749: both are form-urlencoded before being joined and base64-encoded.
    return unquote_plus(client_id), unquote_plus(client_secret)


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class _Server(ThreadingHTTPServer):
    """The socket server; it also tracks open connections so that stop() can sever them.

    Without that, a client's pooled keep-alive connection would keep getting answers from a
    "stopped" fake, and tests of an unreachable server would silently pass through it.
    """

    daemon_threads = True
    request_queue_size = 128  # 32 clients connecting at once must not overflow the backlog

    def __init__(self, address: tuple[str, int], fake: FakeEdrv) -> None:
        self.fake = fake
        self.tls = fake.tls
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on reverse DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        connection, address = self.socket.accept()
        if self.tls is not None:
            # The handshake happens on the handler thread's first read, so that a slow or
            # failing client never holds up the accept loop.
            connection = self.tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def sever_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout tests) makes our late write fail: not worth a traceback.
        # With TLS, a client that distrusts our certificate aborts the handshake: expected too.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API behind its load balancer
    disable_nagle_algorithm = True  # otherwise each response waits ~40 ms for a delayed ACK
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: test output should not be flooded with access logs."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, off by the fake's ``clock_offset`` seconds (a skewed server)."""
        moment = time.time() + self.server.fake.clock_offset if timestamp is None else timestamp
        return super().date_time_string(moment)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path == "/oauth/token":
                self._token_endpoint()
            elif path.startswith(("/v1.1/", "/v1/")):
                self._api_endpoint(path)
            elif path == "/redirect":
                self._redirect()
            else:
                self._read_body()
                self._send_json(404, {"ok": False, "message": "not found", "result": None})
        except BadRequest as exc:
            self.close_connection = True  # the body may be partly unread: do not reuse
            if path == "/oauth/token":
                error = {"error": "invalid_request", "error_description": str(exc)}
                self._send_json(400, error)
            else:
                self._send_json(400, {"ok": False, "message": str(exc), "result": None})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        """Read the whole request body, so that the connection can be reused for the next one."""
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise BadRequest(f"unsupported Transfer-Encoding: {transfer_encoding}")
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest("bad Content-Length")
        data = self.rfile.read(length)
        if len(data) != length:
            raise BadRequest("body shorter than Content-Length")
        return data

    def _read_chunked(self) -> bytes:
        """Decode a chunked body (requests sends generator bodies this way)."""
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size line") from None
            if size < 0 or total + size > MAX_BODY:
                raise BadRequest("bad chunk size")
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(1024).strip() != b"":
                raise BadRequest("truncated or malformed chunk")
            parts.append(chunk)
            total += size
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # skip trailer fields
        return b"".join(parts)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length":  # always computed here, so never wrong
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _token_endpoint(self) -> None:
        fake = self.server.fake
        if self.command != "POST":
            self._read_body()
            self._send(405, b"", {"Allow": "POST"})
            return
        with fake._lock:
            fake.token_requests += 1
        form = _parse_token_request(self._read_body(), self.headers.get("Content-Type", ""))
        basic = _basic_credentials(self.headers.get("Authorization"))
        if basic is not None:
            if "client_secret" in form:
                raise BadRequest("client authenticated with more than one method")
            form = {**form, "client_id": basic[0], "client_secret": basic[1]}
        with fake._lock:
            fake.token_forms.append(form)
            fake.token_headers.append({name.lower(): value for name, value in self.headers.items()})
            canned = fake._token_queue.popleft() if fake._token_queue else None
        if fake.token_delay > 0:
            time.sleep(fake.token_delay)
        if canned is not None:
            time.sleep(canned.delay)
            if canned.drop:
                self.close_connection = True  # close without writing a single byte
            else:
                self._send(canned.status, canned.body, canned.headers)
            return
        if form.get("grant_type") != "client_credentials":
            description = f"Unsupported grant type: {form.get('grant_type', '')}"
            self._send_json(
                400, {"error": "unsupported_grant_type", "error_description": description}
            )
        elif (
            form.get("client_id") != fake.client_id
            or form.get("client_secret") != fake.client_secret
        ):
            self._send_json(401, {"error": "access_denied", "error_description": "Unauthorized"})
        elif form.get("audience") != fake.audience:
            description = f"Service not enabled within domain: {form.get('audience', '')}"
            self._send_json(403, {"error": "access_denied", "error_description": description})
        else:
            expires_in = fake.expires_in
            token = fake.issue_token(expires_in)
            with fake._lock:
                fake.tokens_issued += 1
            reported = int(expires_in) if float(expires_in).is_integer() else expires_in
            payload = {
                "access_token": token,
                "expires_in": reported,
                "token_type": "Bearer",
                "scope": fake.scope,
            }
            headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
            self._send(200, json.dumps(payload).encode(), headers)

    def _api_endpoint(self, path: str) -> None:
        fake = self.server.fake
        auth_header = self.headers.get("Authorization")
        with fake._lock:
            fake.api_requests += 1
        body = self._read_body()
        with fake._lock:
            # Appended together so that api_auth_headers[i] belongs to api_bodies[i].
            fake.api_bodies.append(body)
            fake.api_auth_headers.append(auth_header)
            canned = fake._api_queue.popleft() if fake._api_queue else None
        if fake.api_delay > 0:
            time.sleep(fake.api_delay)
        if canned is not None:
            status, payload, headers = canned.status, canned.body, canned.headers
        elif fake.reject_all or not fake._token_is_valid(_bearer_token(auth_header)):
            status, headers = 401, {"Content-Type": "application/json"}
            payload = json.dumps({"ok": False, "message": "jwt expired", "result": None}).encode()
        else:
            result = {
                "method": self.command,
                "path": path,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            self._send_json(200, {"ok": True, "message": "ok", "result": result})
            return
        if status == 401:
            with fake._lock:
                fake.api_401s += 1
        self._send(status, payload, headers)

    def _redirect(self) -> None:
        self._read_body()
        query = parse_qs(urlsplit(self.path).query)
        target = query.get("to", [""])[0]
        code = query.get("code", ["302"])[0]
        if not target or not code.isdigit() or not 300 <= int(code) <= 399:
            raise BadRequest("need ?to=<absolute url> and an optional 3xx code")
        self._send(int(code), b"", {"Location": target})


class FakeEdrv:
    """The fake eDRV: token endpoint, authenticated API, redirects, counters and fault injection.

    Settable attributes (expires_in, token_delay, api_delay, reject_all, clock_offset) may be
    changed while it runs; each request reads them when it is handled. Counters are updated under
    a lock.
    """

    #: The one API key the API accepts as a bearer token, as eDRV accepts its API keys.
    api_key = "test-api-key"

    token_requests: int
    tokens_issued: int
    api_requests: int
    api_401s: int
    api_bodies: list[bytes]
    token_forms: list[dict[str, str]]
    #: The headers of every token request, names lower-cased (what reached the endpoint).
    token_headers: list[dict[str, str]]
    api_auth_headers: list[str | None]

    def __init__(
        self,
        *,
        client_id: str = "test-client-id",
        client_secret: str = "test-client-secret",  # noqa: S107 (a fake)
        audience: str = "https://api.edrv.io",
        expires_in: float = 86400,
        scope: str = "read:chargestations write:sessions",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: serve HTTPS with this server context, reached as ``https://localhost:PORT``."""
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.expires_in = expires_in
        self.scope = scope
        self.host = host
        self.port = port
        self.tls = tls
        self.token_delay = 0.0
        self.api_delay = 0.0
        self.reject_all = False
        #: Seconds added to the time in every ``Date`` header: a server whose clock is off.
        self.clock_offset = 0.0
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> server-side expiry (time.monotonic())
        self._issued: list[str] = []  # every token ever minted, for the tests' leak watch
        self._token_queue: deque[_Canned] = deque()
        self._api_queue: deque[_Canned] = deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self.reset_counters()

    def start(self) -> FakeEdrv:
        """Bind and serve in a daemon thread; calling it again while running is a no-op."""
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            if self.tls is None:
                self._url = f"http://{self._server.server_name}:{self._server.server_port}"
            else:  # the certificate names localhost, as a real one names its host
                self._url = f"https://localhost:{self._server.server_port}"
            # A short poll interval keeps stop() fast (serve_forever polls for shutdown()).
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name="fake-edrv",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and sever open keep-alive connections; safe to call twice."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None or thread is None:
            return
        server.shutdown()
        server.sever_connections()
        server.server_close()
        thread.join(timeout=5)

    def __enter__(self) -> FakeEdrv:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL; kept after stop() so that tests can aim at a server that went away."""
        if self._url is None:
            raise RuntimeError("FakeEdrv was never started; call start() first")
        return self._url

    @property
    def token_url(self) -> str:
        return self.url + "/oauth/token"

    def environment(self, cache_dir: object = None) -> dict[str, str]:
        """The EDRV_* variables that point edrv_auth at this fake, with its credentials.

        ``cache_dir`` (a path), if given, becomes ``EDRV_AUTH_CACHE_DIR``.
        """
        env = {
            "EDRV_CLIENT_ID": self.client_id,
            "EDRV_CLIENT_SECRET": self.client_secret,
            "EDRV_TOKEN_URL": self.token_url,
            "EDRV_API_URL": self.url,
        }
        if cache_dir is not None:
            env["EDRV_AUTH_CACHE_DIR"] = str(cache_dir)
        return env

    def api_key_environment(self) -> dict[str, str]:
        """The EDRV_* variables that point edrv_auth at this fake in API-key mode."""
        return {"EDRV_API_KEY": self.api_key, "EDRV_API_URL": self.url}

    def reset_counters(self) -> None:
        """Zero the counters and recorded requests (queued responses and tokens are kept)."""
        with self._lock:
            self.token_requests = 0
            self.tokens_issued = 0
            self.api_requests = 0
            self.api_401s = 0
            self.api_bodies = []
            self.token_forms = []
            self.token_headers = []
            self.api_auth_headers = []

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "token_requests": self.token_requests,
                "tokens_issued": self.tokens_issued,
                "api_requests": self.api_requests,
                "api_401s": self.api_401s,
            }

    def expire_all(self) -> None:
        """Invalidate every token issued so far, as if they had all expired on the server."""
        with self._lock:
            self._tokens.clear()

    def issue_token(self, expires_in: float | None = None) -> str:
        """Mint a valid token directly (to seed a cache); counts neither a request nor an issue."""
        lifetime = self.expires_in if expires_in is None else expires_in
        token = "fake-token-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + lifetime
            self._issued.append(token)
        return token

    @property
    def issued_tokens(self) -> list[str]:
        """Every token minted so far, even expired ones: the tests check none reaches a log."""
        with self._lock:
            return list(self._issued)

    def _token_is_valid(self, token: str | None) -> bool:
        if token is not None and token == self.api_key:  # API-key mode: the key is the token
            return True
        with self._lock:
            expiry = self._tokens.get(token) if token is not None else None
        return expiry is not None and time.monotonic() < expiry

    def queue_token_response(
        self,
        status: int,
        body: bytes | str | dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        """Make the next token request get exactly this response (FIFO, each used once)."""
        with self._lock:
            self._token_queue.append(_make_canned(status, body, headers, delay))

    def clear_queues(self) -> None:
        """Drop every queued token and API response not used yet."""
        with self._lock:
            self._token_queue.clear()
            self._api_queue.clear()

    def queue_token_drop(self) -> None:
        """Make the next token request see its connection closed without any response."""
        with self._lock:
            self._token_queue.append(_Canned(0, b"", {}, drop=True))

    def queue_api_response(
        self, status: int, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        """Make the next API request (after its body is read and counted) get this response."""
        with self._lock:
            self._api_queue.append(_make_canned(status, body, headers, 0.0))


def _exports(env: dict[str, str]) -> str:
    return "  export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())


def _instructions(fake: FakeEdrv) -> str:
    """What `python tests/fake_edrv.py` prints: where it runs, the variables to export, the stop."""
    credentials = fake.environment()
    urls = {name: credentials.pop(name) for name in ("EDRV_TOKEN_URL", "EDRV_API_URL")}
    return "\n".join(
        [
            f"fake eDRV on {fake.url} (Ctrl-C stops it)",
            "for client credentials, in another shell:",
            _exports(credentials),
            _exports(urls),
            f"or for an API key (this fake accepts {fake.api_key}):",
            "  unset EDRV_CLIENT_ID EDRV_CLIENT_SECRET EDRV_TOKEN_URL",
            _exports(fake.api_key_environment()),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake eDRV server in the foreground.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    parser.add_argument("--expires-in", type=float, default=86400, help="token lifetime, seconds")
    args = parser.parse_args(argv)
    fake = FakeEdrv(port=args.port, expires_in=args.expires_in).start()
    print(_instructions(fake), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
