"""Start ``tests/fake_openai_server.py`` as a real process on loopback and steer it (faults, request log)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

FAKE_SERVER = Path(__file__).resolve().parent / "fake_openai_server.py"

VL_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
TEXT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


class FakeOpenAIServer:
    """A running fake server: ``url`` is its API root (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, *models: str, api_key: str | None = None, startup_timeout_s: float = 30.0) -> None:
        cmd = [sys.executable, str(FAKE_SERVER), "--port", "0"]
        for model in models or (VL_MODEL, TEXT_MODEL):
            cmd += ["--model", model]
        if api_key:
            cmd += ["--api-key", api_key]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_timeout_s)
        if not line or not line[0].startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"fake OpenAI server did not start: {line}")
        self.root = line[0].split()[1].rstrip("/")
        self.url = self.root + "/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.root + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def faults(self, *rules: dict[str, Any]) -> None:
        """Replace the fault rules: ``{"match": text or image id, "fault": ..., "times": n or None}``."""
        self._call("POST", "/_faults", list(rules))

    def reset(self) -> None:
        self._call("POST", "/_reset", {})

    def log(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_log")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
