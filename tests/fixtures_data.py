"""Fixtures for the data sources: a local HTTP server, a Google Drive stand-in, a GCS emulator.

Import them explicitly: `from fixtures_data import http_server, ...` (pytest's default import
mode puts tests/ on sys.path, as long as tests/ has no __init__.py). Nothing here talks to any
address but 127.0.0.1.
"""

import hashlib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests.adapters

import sdtune.data.sources


class Route:
    """One canned answer. fail_first: that many 503s first; cut_first: the first answer stops halfway;
    stall: seconds to wait before answering (a server that has stopped sending)."""

    def __init__(self, body: bytes, status=200, headers=None, ranges=True, fail_first=0, cut_first=False, stall=0.0):
        self.body, self.status, self.headers, self.ranges = body, status, dict(headers or {}), ranges
        self.fail_first, self.cut_first, self.stall = fail_first, cut_first, stall


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        ids = urllib.parse.parse_qs(parts.query).get("id")
        key = parts.path + (f"?id={ids[0]}" if ids else "")
        server = self.server
        server.log.append((key, self.headers.get("Range")))
        server.if_range.append(self.headers.get("If-Range"))
        route = server.routes.get(key)
        if route is None:
            return self._send(404, b"not found", {"Content-Type": "text/plain"})
        time.sleep(route.stall)
        if route.fail_first:
            route.fail_first -= 1
            return self._send(503, b"try later", {"Content-Type": "text/plain"})
        body, status = route.body, route.status
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{hashlib.md5(body).hexdigest()}"',
                   **route.headers}
        asked = self.headers.get("Range", "")
        # If-Range as RFC 9110 says: a validator that no longer matches the file's ETag (the file
        # changed since the client's first part) gets the whole file, not a range of the new one.
        if self.headers.get("If-Range") not in (None, headers["ETag"]):
            asked = ""
        if route.ranges and asked.startswith("bytes=") and status == 200:
            start = int(asked[6:].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            body, status = body[start:], 206
        if route.cut_first:
            route.cut_first = False
            self.close_connection = True
            return self._send(status, body, headers, cut=len(body) // 2)
        self._send(status, body, headers)

    def _send(self, status, body, headers, cut=None):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up on a stalled answer
            super().handle_error(request, client_address)


class LocalServer:
    def __init__(self):
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        # log: (path, Range) of each request; if_range: its If-Range header (None where not sent).
        self.httpd.routes, self.httpd.log, self.httpd.if_range = {}, [], []
        self.routes, self.log, self.if_range = self.httpd.routes, self.httpd.log, self.httpd.if_range
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(sdtune.data.sources, "BACKOFF_BASE", 0.0)  # retries without waiting
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def drive_stand_in(http_server, monkeypatch):
    """gdown's seam: every request goes through requests' HTTPAdapter.send, where *.google.com
    URLs are pointed at the local server (path and query kept). Anything else not on
    127.0.0.1 fails the test, so nothing leaks to the network."""
    send = requests.adapters.HTTPAdapter.send

    def local_send(self, request, **kwargs):
        parts = urllib.parse.urlsplit(request.url)
        if parts.hostname and parts.hostname.endswith("google.com"):
            request.url = urllib.parse.urlunsplit(("http", f"127.0.0.1:{http_server.port}", parts.path,
                                                   parts.query, ""))
        assert urllib.parse.urlsplit(request.url).hostname == "127.0.0.1", request.url
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", local_send)
    return http_server


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gcs_emulator(monkeypatch, tmp_path):
    """A real gcp-storage-emulator on 127.0.0.1; yields a storage client pointed at it."""
    port = free_port()
    log = open(tmp_path / "emulator.log", "wb")
    proc = subprocess.Popen(["gcp-storage-emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start: {(tmp_path / 'emulator.log').read_text()}")
                time.sleep(0.05)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("NO_GCE_CHECK", "true")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        yield storage.Client(credentials=AnonymousCredentials(), project="test")
    finally:
        proc.kill()
        proc.wait()
        log.close()
