"""A fault-injecting HTTP proxy for S3 tests (stdlib only): http.server in front, http.client behind.

Every ``every``-th request (counted across all clients, at most ``max_faults`` in all) gets a fault in
turn: a 500 InternalError, a 503 SlowDown, or a connection dropped before it is forwarded. Separately,
the first PUT of a key ending in ``lost_response_suffix`` is forwarded and then its answer is dropped:
the write happened but the client cannot know, so its retry meets its own object (the classic hazard
of a retried conditional put). ``counts`` says what was done, so a test can prove faults were injected.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "expect", "content-length"}
KINDS = ("500", "503", "drop")


class FaultProxy:
    def __init__(self, upstream: str, every: int = 7, max_faults: int = 24,
                 lost_response_suffix: str | None = "_manifest.json") -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.every, self.max_faults, self.lost_suffix = every, max_faults, lost_response_suffix
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(self.counts[k] for k in (*KINDS, "lost_response"))

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to forward it faithfully."""
        with self.lock:
            self.counts["requests"] += 1
            if (method == "PUT" and self.lost_suffix and path.split("?")[0].endswith(self.lost_suffix)
                    and not self.counts["lost_response"]):
                self.counts["lost_response"] += 1
                return "lost_response"
            injected = sum(self.counts[k] for k in KINDS)
            if self.counts["requests"] % self.every == 0 and injected < self.max_faults:
                kind = KINDS[injected % len(KINDS)]
                self.counts[kind] += 1
                return kind
            return None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _error(self, status: int, code: str) -> None:
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected by faultproxy</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            body = self._body()
            fault = proxy.decide(self.command, self.path)
            if fault == "drop":
                self.close_connection = True  # no answer at all: the client sees the connection reset
                return
            if fault in ("500", "503"):
                self._error(int(fault), "InternalError" if fault == "500" else "SlowDown")
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        conn.putheader(k, v)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                headers = resp.getheaders()
                status, reason = resp.status, resp.reason
            finally:
                conn.close()
            if fault == "lost_response":  # forwarded and done upstream, but the answer never arrives
                self.close_connection = True
                return
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length if length is not None else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

    return Handler
