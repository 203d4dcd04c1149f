"""A stand-in for vLLM's OpenAI-compatible server, run as a real process on loopback by the tests.

::

    python tests/fake_openai_server.py --model M [--model M2 ...] [--host 127.0.0.1] [--port 0] [--api-key K]

Unknown arguments are accepted and ignored, so the vLLM server launcher can start it with a vLLM command
line. It prints ``LISTENING http://HOST:PORT`` once it accepts connections.

What it does, so that the tests exercise the real HTTP path and not a mock:

* ``GET /health``, ``GET /v1/models`` as vLLM answers them;
* ``POST /v1/chat/completions`` **checks the request's shape** the way vLLM would refuse it (HTTP 400/404):
  a served ``model``, ``messages`` with known roles, content as text or parts, every image part a
  ``data:image/...;base64,`` URL whose bytes Pillow decodes as the declared format, sane ``max_tokens``,
  ``temperature`` and ``response_format``; and the API key when started with one;
* it **answers deterministically**, by task: a caption derived from the image's bytes (:func:`caption_for`),
  a cluster subject as JSON, or scene prompts as JSON in the requested counts per skill, both read from the
  JSON input the pipeline's prompts carry;
* **faults on command**: ``POST /_faults`` with ``[{"match": S, "fault": F, "times": N}]`` makes requests
  whose messages contain ``S`` (or whose images have content id ``S``) fail ``N`` times (``null``:
  always) with ``F``: ``status:CODE[:RETRY_AFTER]``, ``slow:SECONDS``, ``trickle:SECONDS``, ``disconnect``,
  ``invalid_json`` (the body is not JSON), ``truncated_json`` (the body stops halfway),
  ``content_invalid_json`` / ``content_truncated`` / ``content_wrong`` / ``content_empty`` (the model's
  text is not JSON / is cut at ``max_tokens`` / breaks the requested schema / is empty);
* ``GET /_log`` lists every chat request (task, model, image ids, fault applied, shape error, number of
  messages); ``POST /_reset`` clears faults and log.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

SKILL_WORDS = ("aurora", "basalt cliff", "cactus garden", "dune", "ember glow", "fjord", "glacier", "harbor",
               "island", "jungle", "kelp forest", "lagoon", "meadow", "nebula", "oasis", "prairie", "quarry",
               "reef", "savanna", "tundra", "volcano", "waterfall", "canyon", "orchard")


def image_content_id(data: bytes) -> str:
    """Same as ``schemas.ids.content_id`` (kept separate: this script runs without the project)."""
    return hashlib.sha256(data).hexdigest()[:32]


def caption_for(data: bytes) -> str:
    """The deterministic caption this server gives an image: its brightness and colour cast, and its id."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8))
    pixels = list(image.getdata())
    r, g, b = (sum(p[i] for p in pixels) / len(pixels) for i in range(3))
    tone = "bright" if (r + g + b) / 3 > 150 else "dark" if (r + g + b) / 3 < 90 else "muted"
    cast = max((("red", r), ("green", g), ("blue", b)), key=lambda item: item[1])[0]
    return f"A {tone} photo with a {cast} cast showing object {image_content_id(data)[:8]} on a plain background."


def subject_for(captions: list[str | None]) -> str:
    """The deterministic subject this server names for a cluster with these captions (in image order)."""
    return f"sample object {hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:6]}"


class Shape(Exception):
    """The request is malformed (answered 400, or 404 for an unknown model)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class State:
    def __init__(self, models: list[str], api_key: str | None) -> None:
        self.models = models
        self.api_key = api_key
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.in_flight = 0


def _decode_data_url(url: Any) -> tuple[str, bytes]:
    if not isinstance(url, str):
        raise Shape("image_url.url must be a string")
    match = re.fullmatch(r"data:image/(jpeg|png|webp|gif);base64,([A-Za-z0-9+/=]+)", url)
    if not match:
        raise Shape(f"image_url.url must be a base64 data URL of an image, got {url[:40]!r}")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError) as error:
        raise Shape(f"invalid base64 image: {error}") from error
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # noqa: BLE001 -- any decode failure is the client's fault here
        raise Shape(f"image does not decode: {error}") from error
    declared = match.group(1).upper().replace("JPG", "JPEG")
    if image.format != declared:
        raise Shape(f"data URL says image/{match.group(1)} but the bytes are {image.format}")
    return declared, data


def check_request(body: Any, state: State) -> dict[str, Any]:
    """Validate a chat-completions request; returns what the answer needs (task, images, texts, schema)."""
    if not isinstance(body, dict):
        raise Shape("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Shape("model is required")
    if model not in state.models:
        raise Shape(f"The model `{model}` does not exist.", 404)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Shape("messages must be a non-empty list")
    texts: list[str] = []
    images: list[tuple[str, bytes]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise Shape(f"messages[{i}] needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list) and content:
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if message["role"] != "user":
                        raise Shape("images are only allowed in user messages")
                    images.append(_decode_data_url(part["image_url"].get("url")))
                else:
                    raise Shape(f"messages[{i}]: unsupported content part {str(part)[:80]}")
        else:
            raise Shape(f"messages[{i}].content must be a string or a list of parts")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise Shape("max_tokens must be a positive integer")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise Shape("temperature must be a number within 0..2")
    schema = None
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("json_schema", "json_object",
                                                                                        "text"):
            raise Shape("response_format.type must be json_schema, json_object or text")
        if response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(
                    spec.get("schema"), dict):
                raise Shape("response_format.json_schema needs a name and a schema object")
            schema = (spec["name"], spec["schema"])
    for key in ("guided_json",):
        if key in body:
            schema = ("guided_json", body[key])
    if "structured_outputs" in body:
        schema = ("structured_outputs", (body["structured_outputs"] or {}).get("json"))
    task = "caption" if images else "chat"
    if schema is not None:
        props = (schema[1] or {}).get("properties", {})
        task = "subject" if "class_noun" in props else "prompts" if "prompts" in props else "json"
    return {"task": task, "model": model, "texts": texts, "images": images, "schema": schema,
            "max_tokens": max_tokens, "n_messages": len(messages)}


def _input_json(texts: list[str], key: str) -> dict[str, Any] | None:
    """The first JSON object holding ``key`` inside the request's texts (the pipeline's prompts carry one)."""
    decoder = json.JSONDecoder()
    for text in texts:
        for start in [m.start() for m in re.finditer(r"\{", text)]:
            try:
                value, _ = decoder.raw_decode(text, start)
            except ValueError:
                continue
            if isinstance(value, dict) and key in value:
                return value
    return None


def answer_content(request: dict[str, Any]) -> str:
    task = request["task"]
    if task == "caption":
        return caption_for(request["images"][-1][1])
    if task == "subject":
        data = _input_json(request["texts"], "captions") or {"captions": []}
        captions = data["captions"]
        return json.dumps({"subject": subject_for(captions), "class_noun": "object", "is_live": False,
                           "captions": [f"A photo of the sample object: {c or 'no caption'}" for c in captions]})
    if task == "prompts":
        data = _input_json(request["texts"], "counts") or {"counts": {}}
        prompts = []
        i = 0
        for skill, n in sorted(data["counts"].items()):
            for _ in range(int(n)):
                prompts.append({"prompt": f"a {{subject}} beside a {SKILL_WORDS[i % len(SKILL_WORDS)]}",
                                "skill": skill})
                i += 1
        return json.dumps({"prompts": prompts})
    return "ok"


def _completion(model: str, content: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-" + hashlib.sha256(content.encode()).hexdigest()[:12], "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(content.split()), "total_tokens": 0}}


class Handler(BaseHTTPRequestHandler):
    state: State  # set on the class by main()
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- BaseHTTPRequestHandler's name
        pass

    def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None,
              headers: dict[str, str] | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if self.path == "/health":
            self._send(200, raw=b"")
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"}
                                                         for m in self.state.models]})
        elif self.path == "/_log":
            with self.state.lock:
                self._send(200, list(self.state.log))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/_faults":
            with self.state.lock:
                self.state.rules = list(self._body())
            self._send(200, {"ok": True})
            return
        if self.path == "/_reset":
            with self.state.lock:
                self.state.rules, self.state.log = [], []
            self._send(200, {"ok": True})
            return
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        with self.state.lock:
            self.state.in_flight += 1
            in_flight = self.state.in_flight
        try:
            self._chat({"time": time.time(), "fault": None, "shape_error": None, "in_flight": in_flight})
        finally:
            with self.state.lock:
                self.state.in_flight -= 1

    def _chat(self, entry: dict[str, Any]) -> None:
        try:
            if self.state.api_key and self.headers.get("Authorization") != f"Bearer {self.state.api_key}":
                raise Shape("invalid API key", 401)
            if "application/json" not in (self.headers.get("Content-Type") or ""):
                raise Shape("Content-Type must be application/json")
            try:
                body = self._body()
            except ValueError as error:
                raise Shape(f"body is not JSON: {error}") from error
            request = check_request(body, self.state)
        except Shape as error:
            entry["shape_error"] = str(error)
            with self.state.lock:
                self.state.log.append(entry)
            self._send(error.status, {"object": "error", "message": str(error), "type": "BadRequestError",
                                      "code": error.status})
            return
        image_ids = [image_content_id(data) for _, data in request["images"]]
        entry.update(task=request["task"], model=request["model"], image_ids=image_ids,
                     n_messages=request["n_messages"], max_tokens=request["max_tokens"])
        fault = self._take_fault(request, image_ids)
        entry["fault"] = fault
        with self.state.lock:
            self.state.log.append(entry)
        self._respond(request, fault)

    def _take_fault(self, request: dict[str, Any], image_ids: list[str]) -> str | None:
        text = "\n".join(request["texts"])
        with self.state.lock:
            for rule in self.state.rules:
                if rule.get("times") is not None and rule["times"] <= 0:
                    continue
                match = rule.get("match", "")
                if match in image_ids or match in text:
                    if rule.get("times") is not None:
                        rule["times"] -= 1
                    return rule["fault"]
        return None

    def _respond(self, request: dict[str, Any], fault: str | None) -> None:
        model = request["model"]
        kind, _, arg = (fault or "").partition(":")
        if kind == "status":
            code, _, retry_after = arg.partition(":")
            headers = {"Retry-After": retry_after} if retry_after else None
            self._send(int(code), {"object": "error", "message": f"injected HTTP {code}", "code": int(code)},
                       headers=headers)
            return
        if kind == "disconnect":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "slow":
            time.sleep(float(arg))
        content = answer_content(request)
        if kind == "invalid_json":
            self._send(200, raw=b"<html><body>502 Bad Gateway</body></html>")
            return
        if kind == "truncated_json":
            body = json.dumps(_completion(model, content)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "trickle":
            body = json.dumps(_completion(model, content)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            pause = float(arg) / max(len(body), 1)
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:
                pass
            return
        finish = "stop"
        if kind == "content_invalid_json":
            content = "Sure! Here is what you asked for: " + content
        elif kind == "content_truncated":
            content, finish = content[: max(len(content) // 2, 1)], "length"
        elif kind == "content_wrong":
            content = json.dumps({"unexpected": True}) if request["task"] != "caption" else "word " * 400
        elif kind == "content_empty":
            content = ""
        self._send(200, _completion(model, content, finish))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    args, _unknown = parser.parse_known_args(argv)
    Handler.state = State(args.model, args.api_key)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"LISTENING http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
