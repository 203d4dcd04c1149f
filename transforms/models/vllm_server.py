"""A vLLM OpenAI-compatible server that a worker starts for itself, the way Beam's
``apache_beam.ml.inference.vllm_inference`` does (``python -m vllm.entrypoints.openai.api_server --model M --port P``).

:class:`VLLMServer` starts the server on a free loopback port, polls ``GET /v1/models`` until the model is
served, and raises :class:`ServerStartError` with the exit code and the server's last output lines when it dies
or never becomes healthy. Its owner decides how long it lives: ``with VLLMServer(...) as server:`` stops it at
the end of the block; the model stages' handler (:func:`transforms.models.model_stage.connect`) holds it as part
of the model ``RunInference`` loads, one per model and worker machine, and it stops when that model is released
(:meth:`~VLLMServer.stop` from ``__del__``, as Beam's own launcher). Nothing process-wide keeps servers alive.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transforms.models.llm_client import ChatClient, LLMError

LOG = logging.getLogger(__name__)

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class ServerStartError(RuntimeError):
    """A vLLM server died or never became healthy."""


def vllm_server_command(model: str, port: int, server_args: Mapping[str, Any] | None = None, *,
                        host: str = "127.0.0.1", python: str | None = None) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server --model M --host H --port P [--key value ...]``.

    ``server_args`` values: ``True`` makes a bare flag, ``None``/``False`` leaves the flag out, mappings
    and lists are passed as JSON (as vLLM expects for ``--limit-mm-per-prompt`` and the like).
    """
    cmd = [python or sys.executable, "-m", VLLM_SERVER_MODULE, "--model", model, "--host", host, "--port", str(port)]
    for key, value in (server_args or {}).items():
        flag = "--" + str(key).lstrip("-")
        if value is None or value is False:
            continue
        if value is True:
            cmd.append(flag)
        elif isinstance(value, (dict, list)):
            cmd += [flag, json.dumps(value)]
        else:
            cmd += [flag, str(value)]
    return cmd


def pick_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_process(cmd: Sequence[str]) -> subprocess.Popen:
    """Start a server process with its output piped (the process boundary; tests patch it)."""
    LOG.info("starting %s", " ".join(cmd))
    return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop_process(process: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace_s)
    except (OSError, subprocess.TimeoutExpired):
        pass


class VLLMServer:
    """A vLLM OpenAI-compatible server run by this process for one model (see the module docstring);
    ``with VLLMServer(...) as server:`` starts it and stops it at the end of the block.

    Args:
        model: the model id (``--model``); also what the health check waits to see served.
        server_args: extra server arguments (:func:`vllm_server_command`).
        startup_timeout_s: how long the model may take to load before :class:`ServerStartError`.
        command: a different command line; ``{port}`` in it is replaced by the chosen port (tests use
            it to start a stand-in server).
        start_attempts: a server that exits before becoming healthy (a port taken in the meantime, say)
            is started again on a new port, this many times in all.
    """

    def __init__(self, model: str, server_args: Mapping[str, Any] | None = None, *,
                 startup_timeout_s: float = 1800.0, poll_interval_s: float = 2.0, host: str = "127.0.0.1",
                 command: Sequence[str] | None = None, start_attempts: int = 2) -> None:
        self.model = model
        self._server_args = dict(server_args or {})
        self._startup_timeout_s = startup_timeout_s
        self._poll_interval_s = poll_interval_s
        self._host = host
        self._command = list(command) if command else None
        self._start_attempts = max(1, start_attempts)
        self._process: subprocess.Popen | None = None
        self._port = -1
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self.command: list[str] = []
        """The command line of the running server."""

    def command_for(self, port: int) -> list[str]:
        if self._command:
            return [arg.replace("{port}", str(port)) for arg in self._command]
        return vllm_server_command(self.model, port, self._server_args, host=self._host)

    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}/v1"

    def start(self) -> VLLMServer:
        """Start the server and wait until it serves the model; raises :class:`ServerStartError`."""
        for attempt in range(1, self._start_attempts + 1):
            self._port = pick_free_port(self._host)
            self.command = self.command_for(self._port)
            self._tail.clear()
            self._process = start_process(self.command)
            self._pump_output(self._process)
            try:
                self._wait_until_healthy()
                LOG.info("vLLM server for %s is serving at %s", self.model, self.base_url())
                return self
            except _ExitedEarly as exited:
                if attempt == self._start_attempts:
                    raise ServerStartError(f"vLLM server for {self.model} exited with code {exited.code} before "
                                           f"serving the model ({attempt} attempts); command: "
                                           f"{' '.join(self.command)}; last output:\n{self.last_output()}") from None
                LOG.warning("vLLM server for %s exited with code %s while starting; starting it again",
                            self.model, exited.code)
        raise AssertionError("unreachable")

    def _pump_output(self, process: subprocess.Popen) -> None:
        """Log the server's output (Beam's launcher does the same) and keep its last lines for errors."""
        def pump() -> None:
            stream = process.stdout
            if stream is None:
                return
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "backslashreplace").rstrip()
                self._tail.append(line)
                LOG.info("[vllm %s] %s", self.model, line)

        threading.Thread(target=pump, name="vllm-server-log", daemon=True).start()

    def last_output(self) -> str:
        time.sleep(0.05)  # let the log thread catch the last lines of a process that just exited
        return "\n".join(self._tail) or "(no output)"

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        probe = ChatClient(self.base_url(), timeout_s=min(10.0, self._startup_timeout_s), max_retries=0)
        last_error: Exception | None = None
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise _ExitedEarly(code)
            try:
                served = probe.list_models()
                if self.model in served:
                    return
                last_error = LLMError(f"serves {served}, not {self.model}")
            except LLMError as error:
                last_error = error
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"vLLM server for {self.model} did not become healthy within {self._startup_timeout_s:g}s "
                    f"(last health check: {last_error}); it was stopped. Command: {' '.join(self.command)}; "
                    f"last output:\n{self.last_output()}")
            time.sleep(min(self._poll_interval_s, max(deadline - time.monotonic(), 0.0)))

    def healthy(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            return False
        try:
            return self.model in ChatClient(self.base_url(), timeout_s=10.0, max_retries=0).list_models()
        except LLMError:
            return False

    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit within 15 s)."""
        process, self._process = self._process, None
        _stop_process(process)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            _stop_process(self._process, grace_s=5.0)
        except Exception:  # noqa: BLE001 -- interpreter shutdown: nothing left to report to
            pass


class _ExitedEarly(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def server_tag(model: str) -> str:
    """The ``MultiProcessShared`` tag of the one server per model on a worker machine (a valid file name)."""
    return "icl-vllm-" + hashlib.sha256(model.encode("utf-8")).hexdigest()[:16]


def start_server(model: str, server_args: Mapping[str, Any], startup_timeout_s: float) -> VLLMServer:
    """A started server for ``model`` (what a worker shares through Beam's ``MultiProcessShared``)."""
    return VLLMServer(model, server_args, startup_timeout_s=startup_timeout_s).start()
