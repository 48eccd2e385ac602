"""`mlx-mixtral serve` in a subprocess on a free loopback port, and what a test says to it."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from openai import OpenAI

NAME = "tiny-mixtral"  # the --model-name every test server is started with


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Server:
    """`mlx-mixtral serve` in a subprocess; `url` once it listens."""

    def __init__(self, folder: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model", str(folder), "--model-name", NAME,
             "--port", "0", "--temp", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
        self.proc.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self.log))

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        url = urlsplit(self.url)
        return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)

    def send(self, method: str, path: str, body=None, timeout: float = 60) -> Reply:
        """One request on its own connection (plain stdlib HTTP, as a script would do it)."""
        content = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=content, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def post(self, path: str, body) -> Reply:
        return self.send("POST", path, body)

    def health(self) -> dict:
        return self.send("GET", "/health", timeout=10).json()

    def wait_for(self, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if predicate(h):
                return h
            time.sleep(0.02)
        raise AssertionError(f"/health never matched: {self.health()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
