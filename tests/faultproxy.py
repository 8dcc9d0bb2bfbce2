"""A fault-injecting HTTP/1.1 proxy for tests: 127.0.0.1:<port> → an upstream HTTP server
(the loopback Swift proxy), in threads of the test process.

Each request is read whole, then, drawn from a seeded RNG, one of:

- `503`: answered 503 by the proxy itself (upstream never sees it), connection closed;
- `reset_before`: the connection is reset (RST) before the request is forwarded;
- `reset_after`: forwarded, upstream executes it, then the connection is reset: the client
  never learns the answer (its retry meets the effect: 412, 404, ...);
- `cut`: (GET with a body only) headers and the first half of the body, then a reset;
- `delay`: forwarded after sleeping up to `max_delay` seconds;
- nothing: forwarded as is.

Bounded: at most `max_faults` faults in all, and never more than `max_in_a_row` faults
(delays aside) in a row, so a client that retries always gets through. An auth answer's
X-Storage-Url pointing at the upstream is rewritten to point at the proxy, so the data path
goes through it too. Every upstream request goes on a connection of its own.
"""

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

FAULTS = ("503", "reset_before", "reset_after", "cut")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
MAX_LINE = 65536


class _BadRequest(Exception):
    pass


def _read_line(rfile) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise _BadRequest("line too long")
    return line


def _read_request(rfile):
    """(method, target, headers, body) or None at a clean end of the connection."""
    line = _read_line(rfile)
    while line in (b"\r\n", b"\n"):
        line = _read_line(rfile)
    if not line:
        return None
    try:
        method, target, _version = line.decode("latin-1").split()
    except ValueError:
        raise _BadRequest(f"bad request line {line[:80]!r}") from None
    headers: list[tuple[str, str]] = []
    while True:
        line = _read_line(rfile)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    fields = {k.lower(): v for k, v in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int(_read_line(rfile).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while _read_line(rfile) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            parts.append(rfile.read(size))
            _read_line(rfile)
        body = b"".join(parts)
    else:
        length = int(fields.get("content-length", "0") or "0")
        body = rfile.read(length) if length else b""
        if len(body) != length:
            return None  # the client went away mid-body
    return method, target, headers, body


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int,
        fault_rate: float = 0.1,
        delay_rate: float = 0.1,
        max_delay: float = 0.3,
        max_faults: int = 1000,
        max_in_a_row: int = 2,
        upstream_host: str = "127.0.0.1",
        timeout: float = 60.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.fault_rate = fault_rate
        self.delay_rate = delay_rate
        self.max_delay = max_delay
        self.max_faults = max_faults
        self.max_in_a_row = max_in_a_row
        self.timeout = timeout
        self.counts: Counter[str] = Counter()  # requests, each fault kind, delay
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> int:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        thread = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut every client connection, wait for the threads."""
        self._closing = True
        if self._threads:
            self._threads[0].join(timeout=10)  # the accept loop: no new clients after this
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
            threads = self._threads[1:]
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def faults(self) -> int:
        return sum(self.counts[kind] for kind in FAULTS)

    # ---------------------------------------------------------------- serving

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(self.timeout)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            with self._lock:
                self._clients.add(sock)
                self._threads = (
                    [self._threads[0]] + [t for t in self._threads[1:] if t.is_alive()] + [thread]
                )
            thread.start()

    def _choose(self, method: str) -> tuple[str | None, float]:
        with self._lock:
            self.counts["requests"] += 1
            draw = self._rng.random()
            kinds = FAULTS if method == "GET" else FAULTS[:-1]
            kind = self._rng.choice(kinds)
            delay = self._rng.uniform(0, self.max_delay)
            if (
                draw < self.fault_rate
                and self.faults < self.max_faults
                and self._in_a_row < self.max_in_a_row
            ):
                self._in_a_row += 1
                self.counts[kind] += 1
                return kind, 0.0
            self._in_a_row = 0
            if draw < self.fault_rate + self.delay_rate:
                self.counts["delay"] += 1
                return None, delay
            return None, 0.0

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        reset = False
        try:
            while not self._closing:
                request = _read_request(rfile)
                if request is None:
                    return
                method, target, headers, body = request
                kind, delay = self._choose(method)
                if kind == "503":
                    sock.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    return
                if kind == "reset_before":
                    reset = True
                    return
                if delay:
                    time.sleep(delay)
                status, reason, resp_headers, resp_body = self._forward(
                    method, target, headers, body
                )
                if kind == "reset_after" or (kind == "cut" and len(resp_body) < 2):
                    reset = True
                    return
                head = self._response_head(method, status, reason, resp_headers, resp_body)
                if kind == "cut":
                    sock.sendall(head + resp_body[: len(resp_body) // 2])
                    reset = True
                    return
                sock.sendall(head + resp_body)
                if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                    return
        except (OSError, _BadRequest, http.client.HTTPException, ValueError):
            reset = True  # upstream trouble or a client gone: the client sees a reset
        finally:
            with self._lock:
                self._clients.discard(sock)
            rfile.close()
            if reset:
                _reset(sock)
            else:
                sock.close()

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=self.timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body or None)
            resp = conn.getresponse()
            resp_body = resp.read()
            return resp.status, resp.reason, resp.getheaders(), resp_body
        finally:
            conn.close()

    def _response_head(
        self, method: str, status: int, reason: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"]
        length = None
        for name, value in headers:
            low = name.lower()
            if low == "content-length":
                length = value
            if low in HOP_BY_HOP:
                continue
            if low == "x-storage-url":
                value = self._rewrite(value)
            lines.append(f"{name}: {value}")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            if length is not None and method == "HEAD":
                lines.append(f"Content-Length: {length}")
        else:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _rewrite(self, url: str) -> str:
        parts = urlsplit(url)
        if (parts.hostname, parts.port) == self.upstream:
            return urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))
        return url
