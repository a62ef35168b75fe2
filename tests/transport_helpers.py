"""Real TLS and real tunnels for the transport tests: a throwaway CA, a CONNECT proxy, drips.

- :class:`TestCA` issues the fake eDRV's certificate from a throwaway CA (``trustme``) and
  writes that CA as a bundle file and as a ``c_rehash``'d folder (``<subject hash>.0``), the
  two forms ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` name.
- :class:`ConnectProxy` is a small threaded HTTP ``CONNECT`` proxy on loopback that records
  every tunnel it opens (and the ``Proxy-Authorization`` it was sent), can demand credentials
  or refuse tunnels, and pipes bytes both ways otherwise.
  It speaks TLS itself when given a server context (an ``https://`` proxy).
- :class:`Socks5Proxy` is a SOCKS5 proxy on loopback (no authentication) that records the
  connections it opens.
- :class:`DripServer` is a raw-socket token endpoint that sends its status line and then
  drips the rest of its answer (headers or body) one byte at a time, forever.
- :class:`RawServer` answers every request with the same raw bytes, then closes: answers
  the fake eDRV would never send (interim ``103``, a short body).
- :func:`blackhole` is a loopback address where connections hang: a listener whose
  backlog is full, so that the kernel drops every new ``SYN``.

Everything is the standard library on loopback; every socket is closed on ``stop()``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import trustme


class TestCA:
    """A throwaway CA, the fake's certificate for localhost, and the CA on disk."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, folder: Path, *, names: tuple[str, ...] = ("localhost", "127.0.0.1")):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*names)
        self.bundle = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.bundle))
        self.folder = folder / "hashed"
        self.folder.mkdir()
        shutil.copy(self.bundle, self.folder / f"{subject_hash(self.ca.cert_pem.bytes())}.0")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def subject_hash(pem: bytes) -> str:
    """OpenSSL's ``x509 -hash`` of a certificate's subject: the name ``c_rehash`` gives it.

    The first 4 bytes (little-endian) of the SHA-1 of the subject's canonical encoding: each
    RDN's SET, values as lower-cased UTF8String with runs of spaces collapsed, without the
    outer SEQUENCE. Computed here so that the tests need no ``openssl`` command.
    """
    import hashlib

    from cryptography import x509  # installed with trustme

    def tlv(tag: int, body: bytes) -> bytes:
        size = len(body)
        length = bytes([size]) if size < 0x80 else bytes([0x80 | 1, size])  # names are short
        return bytes([tag]) + length + body

    def oid(dotted: str) -> bytes:
        first, second, *rest = (int(part) for part in dotted.split("."))
        body = bytes([40 * first + second])
        for number in rest:
            septets = [number & 0x7F]
            number >>= 7
            while number:
                septets.append(0x80 | (number & 0x7F))
                number >>= 7
            body += bytes(reversed(septets))
        return tlv(0x06, body)

    canonical = b""
    for rdn in x509.load_pem_x509_certificate(pem).subject.rdns:
        entries = b""
        for attribute in rdn:
            value = " ".join(str(attribute.value).split()).lower().encode()
            entries += tlv(0x30, oid(attribute.oid.dotted_string) + tlv(0x0C, value))
        canonical += tlv(0x31, entries)
    digest = hashlib.sha1(canonical).digest()  # noqa: S324 - OpenSSL's name hash, not security
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


class _Listener:
    """A loopback listener serving each connection on its own thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0

    def start(self) -> Any:
        self._spawn(self._accept_loop)
        return self

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5)
        with self._lock:
            for sock in self._open:
                sock.close()
            self._open.clear()
        self._listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._open.add(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            with self._lock:
                self.connections += 1
            self._spawn(self._serve, self._track(conn))

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_WR)
                return
            try:
                target.sendall(data)
            except OSError:
                return


def _read_head(conn: socket.socket) -> bytes:
    """Read up to the blank line that ends an HTTP head ("" if the peer went away)."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        try:
            chunk = conn.recv(4096)
        except OSError:
            return b""
        if not chunk:
            return b""
        head += chunk
    return head


class ConnectProxy(_Listener):
    """An HTTP CONNECT proxy on loopback that records the tunnels it opens.

    ``credentials``: a ``user:password`` that clients must send as Basic
    ``Proxy-Authorization`` (else 407). ``refuse``: answer every CONNECT with this status.
    ``route_to``: open every tunnel to this loopback port, whatever host and port the CONNECT
    names (so that a test can ask for ``https://localhost:443`` and reach a fake elsewhere).
    """

    def __init__(
        self,
        *,
        credentials: str | None = None,
        refuse: int | None = None,
        route_to: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        self.credentials = credentials
        self.refuse = refuse
        self.route_to = route_to
        self.tls = tls
        self.tunnels: list[str] = []  # "host:port" of every tunnel opened
        self.authorizations: list[str | None] = []  # Proxy-Authorization of every CONNECT

    @property
    def url(self) -> str:
        userinfo = f"{self.credentials}@" if self.credentials else ""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        import base64

        if self.tls is not None:
            try:
                conn = self._track(self.tls.wrap_socket(conn, server_side=True))
            except OSError:  # a client that distrusts the proxy's certificate
                return
        head = _read_head(conn)
        if not head:
            return
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = ([*lines[0].split(" "), "", "", ""])[:3]
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        authorization = headers.get("proxy-authorization")
        with self._lock:
            self.authorizations.append(authorization)
        expected = (
            "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if self.credentials
            else None
        )
        if method != "CONNECT":
            self._answer(conn, 405, "Method Not Allowed")
        elif self.refuse is not None:
            self._answer(conn, self.refuse, "Refused")
        elif expected is not None and authorization != expected:
            self._answer(conn, 407, "Proxy Authentication Required")
        else:
            host, _, port = target.rpartition(":")
            if self.route_to is not None:
                host, port = "127.0.0.1", str(self.route_to)
            try:
                upstream = self._track(socket.create_connection((host.strip("[]"), int(port)), 5))
            except OSError:
                self._answer(conn, 502, "Bad Gateway")
                return
            with self._lock:
                self.tunnels.append(target)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._spawn(self._pipe, upstream, conn)
            self._pipe(conn, upstream)

    def _answer(self, conn: socket.socket, status: int, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n".encode())
            conn.shutdown(socket.SHUT_WR)


class DripServer(_Listener):
    """A token endpoint that sends ``HTTP/1.1 200 OK`` and then drips, one byte every 0.1 s.

    ``part="headers"``: an endless header. ``part="body"``: a JSON token body announced
    with a Content-Length, endless in practice (2000 bytes).
    """

    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/token"

    def _serve(self, conn: socket.socket) -> None:
        if not _read_head(conn):
            return
        if self.part == "headers":
            head, drip = b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 100000
        else:
            body = b'{"access_token": "drip-' + b"x" * 2000 + b'", "expires_in": 60}'
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(body)}\r\n\r\n".encode()
            drip = body
        try:
            conn.sendall(head)
            for byte in drip:
                if self._stop.wait(0.1):
                    return
                conn.sendall(bytes([byte]))
        except OSError:
            return


class RawServer(_Listener):
    """A token endpoint that answers every request with ``answer``, byte for byte, then closes."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/token"

    def _serve(self, conn: socket.socket) -> None:
        if _read_head(conn):
            with contextlib.suppress(OSError):
                conn.sendall(self.answer)
                conn.shutdown(socket.SHUT_WR)


class Socks5Proxy(_Listener):
    """A SOCKS5 proxy on loopback, without authentication, recording each ``host:port`` it
    connects to (a name as the client sent it: the proxy resolves it)."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        def read(size: int) -> bytes:
            data = b""
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    raise ConnectionError("the client went away")
                data += chunk
            return data

        try:
            _, methods = read(2)
            read(methods)
            conn.sendall(b"\x05\x00")  # no authentication
            _, _, _, kind = read(4)  # version, CONNECT (the only command sent), reserved
            if kind == 1:
                host = socket.inet_ntop(socket.AF_INET, read(4))
            elif kind == 4:
                host = socket.inet_ntop(socket.AF_INET6, read(16))
            else:
                host = read(read(1)[0]).decode("ascii")
            port = int.from_bytes(read(2), "big")
            upstream = self._track(socket.create_connection((host, port), 5))
        except OSError:
            with contextlib.suppress(OSError):
                conn.sendall(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        with self._lock:
            self.targets.append(f"{host}:{port}")
        conn.sendall(b"\x05\x00\x00\x01" + bytes(6))  # succeeded (bound address unused)
        self._spawn(self._pipe, upstream, conn)
        self._pipe(conn, upstream)


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener where new connections hang: its one-slot backlog is filled.

    Returns the listener and the sockets filling its backlog; close them all when done.
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers
