"""An HTTP proxy on 127.0.0.1 that injects object-store faults in front of a real S3-compatible server.

Each request is read whole, then, by a seeded draw: answered `503 SlowDown` without reaching the server (throttling);
dropped before it reaches the server; forwarded and its response dropped (the write happened, the client never hears
of it); forwarded and its response cut in the middle; delayed; or forwarded untouched. Every connection is closed
after one response, so each request is one draw.
"""

from __future__ import annotations

import random
import socket
import socketserver
import threading
import time
from collections import Counter
from urllib.parse import unquote_to_bytes

SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>"
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")


def _read_request(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(head, body) of one HTTP/1.1 request; None when the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"expect", b"").lower() == b"100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if b"content-length" in headers:
        need = int(headers[b"content-length"])
        while len(rest) < need:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            rest += chunk
        body = rest[:need]
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not (rest.endswith(b"0\r\n\r\n") and (rest == b"0\r\n\r\n" or b"\r\n0\r\n" in rest)):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            rest += chunk
        body = rest
    else:
        body = b""
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith((b"connection:", b"expect:", b"keep-alive:"))]
    return b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n", body


def _forward(upstream: tuple[str, int], head: bytes, body: bytes) -> bytes:
    with socket.create_connection(upstream, timeout=60) as up:
        up.sendall(head + body)
        parts = []
        while chunk := up.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a client opening more connections at once than that (a parallel
    # read of manifests, 32 shards in flight; every request is a new connection here) has SYNs dropped and retried
    # a second later, a stall no real object store adds
    request_queue_size = 1024


class FaultProxy:
    """`rates`: probability per request of each fault: throttle, drop, drop_response, cut_response, slow."""

    KINDS = ("throttle", "drop", "drop_response", "cut_response", "slow")

    def __init__(self, upstream: str, rates: dict[str, float], *, seed: int = 0,
                 slow_s: tuple[float, float] = (0.2, 1.0), fail_matching: bytes | None = None):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.rates = {k: float(rates.get(k, 0.0)) for k in self.KINDS}
        self.slow_s = slow_s
        self.fail_matching = fail_matching  # every request whose request line holds it: 500 InternalError
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.lines: list[str] = []  # every request's first line ("GET /bucket/key HTTP/1.1"), in arrival order
        self.enabled = True
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str:
        with self.lock:
            self.counts["requests"] += 1
            if not self.enabled:
                return "ok"
            x = self.rng.random()
            for kind in self.KINDS:
                if x < self.rates[kind]:
                    self.counts[kind] += 1
                    return kind
                x -= self.rates[kind]
            return "ok"

    def _handle(self, sock: socket.socket) -> None:
        request = _read_request(sock)
        if request is None:
            return
        head, body = request
        with self.lock:
            self.lines.append(unquote_to_bytes(head.split(b"\r\n", 1)[0]).decode(errors="replace"))
        if self.fail_matching and self.fail_matching in unquote_to_bytes(head.split(b"\r\n", 1)[0]):
            with self.lock:
                self.counts["failed"] += 1
            sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: "
                         + str(len(INTERNAL)).encode() + b"\r\nConnection: close\r\n\r\n" + INTERNAL)
            return
        fault = self._draw()
        if fault == "throttle":
            sock.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                         + str(len(SLOWDOWN)).encode() + b"\r\nConnection: close\r\n\r\n" + SLOWDOWN)
            return
        if fault == "drop":
            sock.close()
            return
        if fault == "slow":
            time.sleep(random.uniform(*self.slow_s))
        response = _forward(self.upstream, head, body)
        if fault == "drop_response":
            sock.close()
            return
        if fault == "cut_response":
            response = response[: max(1, len(response) // 2)]
        sock.sendall(response)
