"""A real OpenAI-compatible teacher server for the tests (llama-cpp-python's, on the bundled GGUF teacher) and a
fault-injecting proxy of ours in front of it. Both bind to 127.0.0.1 only, bound their work in time, and are stopped
by whoever started them."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_llama_cpp() -> None:
    """In CI the engine must be there (`make test` builds it); elsewhere a machine without it skips these tests."""
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python[server] is not installed: `make test` installs it")
        pytest.skip("llama-cpp-python[server] is not installed (make test installs it)")


class LlamaServer:
    """`python -m llama_cpp.server` on a .gguf, with the log-probs of every prompt token (`--logits_all`)."""

    def __init__(self, gguf: str, log: Path, port: int | None = None, threads: int = 1) -> None:
        self.gguf, self.log, self.port, self.threads = gguf, log, port or free_port(), threads
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180.0) -> LlamaServer:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--logits_all", "true",
                   "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024", "--n_threads", str(self.threads),
                   "--n_batch", "512", "--verbose", "false"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the llama.cpp server ended at start: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if json.load(r).get("data"):
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the llama.cpp server did not answer within {timeout:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Proxy:
    """Forwards requests to a server and counts them; `fault(request_number, path, body) -> action` may answer
    instead: ("stall", seconds), ("status", code), ("json", text), ("rewrite", fn(answer) -> answer), or None to
    forward. At most `limit` requests are served; it runs until `stop()`."""

    def __init__(self, target: str, *, limit: int = 5000) -> None:
        self.target, self.limit = target.rstrip("/"), limit
        self.fault: Callable[[int, str, dict[str, Any]], Any] = lambda n, path, body: None
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.answered: list[tuple[str, dict[str, Any]]] = []  # those the server answered (200)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve(None)

            def do_POST(self) -> None:
                self._serve(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _serve(self, data: bytes | None) -> None:
                body = json.loads(data) if data else {}
                proxy.bodies.append((self.path, body))
                proxy.headers.append(dict(self.headers))
                n = len(proxy.bodies)
                if n > proxy.limit:
                    return self._answer(503, b'{"error": "the proxy served its limit"}')
                action = proxy.fault(n, self.path, body)
                if action and action[0] == "stall":
                    time.sleep(action[1])
                    return self._answer(504, b"{}")
                if action and action[0] == "status":
                    return self._answer(action[1], b'{"error": "injected"}')
                if action and action[0] == "json":
                    return self._answer(200, action[1].encode())
                # /v1/... goes to the API, anything else (/extras/tokenize) to the server's root beside it
                address = (proxy.target + self.path.removeprefix("/v1") if self.path.startswith("/v1/")
                           else proxy.target.removesuffix("/v1") + self.path)
                request = urllib.request.Request(address, data=data, method="POST" if data else "GET",
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=300) as r:
                        answer = r.read()
                except urllib.error.HTTPError as e:
                    return self._answer(e.code, e.read())
                except OSError:
                    return self._answer(502, b'{"error": "the server behind the proxy is down"}')
                proxy.answered.append((self.path, body))
                if action and action[0] == "rewrite":
                    answer = json.dumps(action[1](json.loads(answer))).encode()
                self._answer(200, answer)

            def _answer(self, code: int, payload: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def completions(self, *, echo: bool | None = None, answered: bool = False) -> list[dict[str, Any]]:
        """The completion requests received (or only those the server answered), scoring ones or not."""
        return [b for p, b in (self.answered if answered else self.bodies)
                if p.endswith("/completions") and (echo is None or bool(b.get("echo")) == echo)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
