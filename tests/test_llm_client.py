"""The OpenAI-compatible client against a real HTTP server process on loopback, and the vLLM launcher."""

from __future__ import annotations

import email.utils
import io
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from PIL import Image

from tests.fake_openai_server import caption_for, image_content_id
from tests.llm_server import FAKE_SERVER, TEXT_MODEL, VL_MODEL, FakeOpenAIServer
from transforms.models import model_stage, vllm_server
from transforms.models.llm_client import (
    BadResponse,
    ChatClient,
    ChatResponse,
    DeadlineExceeded,
    HTTPStatusError,
    OutputInvalid,
    RetriesExhausted,
    TransportError,
    image_data_url,
    json_schema_params,
    parse_json_object,
    parse_retry_after,
)
from transforms.models.vllm_server import ServerStartError, VLLMServer, vllm_server_command
from transforms.settings import LLMConfig


@pytest.fixture(scope="module")
def server() -> Any:
    fake = FakeOpenAIServer(VL_MODEL, TEXT_MODEL)
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


def _client(server: FakeOpenAIServer, **kwargs: Any) -> ChatClient:
    settings = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.05, "backoff_max_s": 2.0}
    settings.update(kwargs)
    return ChatClient(server.url, **settings)


def _caption_messages(photo: bytes, text: str = "Describe this photo.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_data_url(photo)}}]}]


def _text_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": text}]


# --- requests and answers ---------------------------------------------------------------------------------

def test_caption_request_has_the_openai_shape_and_gets_a_deterministic_answer(server, product_photos) -> None:
    client = _client(server)
    photo = product_photos[0]
    first = client.chat(VL_MODEL, _caption_messages(photo), max_tokens=64, temperature=0.0)
    again = client.chat(VL_MODEL, _caption_messages(photo), max_tokens=64, temperature=0.0)
    assert first.content == again.content == caption_for(photo)
    assert first.finish_reason == "stop" and not first.truncated and first.model == VL_MODEL
    log = server.log()
    assert [e["shape_error"] for e in log] == [None, None]
    assert log[0]["task"] == "caption" and log[0]["image_ids"] == [image_content_id(photo)]
    assert log[0]["max_tokens"] == 64


def test_the_server_really_checks_shapes(server, product_photos) -> None:
    """A PNG declared as JPEG, a wrong role, an unknown model: refused, and client errors are not retried."""
    png = io.BytesIO()
    Image.open(io.BytesIO(product_photos[0])).save(png, "PNG")
    lying = image_data_url(png.getvalue()).replace("image/png", "image/jpeg")
    client = _client(server)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": lying}}]}]
    with pytest.raises(HTTPStatusError) as caught:
        client.chat(VL_MODEL, bad)
    assert caught.value.status == 400 and "bytes are PNG" in str(caught.value)
    with pytest.raises(HTTPStatusError) as caught:
        client.chat(VL_MODEL, [{"role": "robot", "content": "hi"}])
    assert caught.value.status == 400
    with pytest.raises(HTTPStatusError) as caught:
        client.chat("no/such-model", _text_messages("hi"))
    assert caught.value.status == 404 and "does not exist" in str(caught.value)
    assert len(server.log()) == 3  # no retries of 4xx
    assert client.pop_events() == {"http_400": 2, "http_404": 1}


def test_api_key_is_sent_as_bearer_token() -> None:
    fake = FakeOpenAIServer(TEXT_MODEL, api_key="s3cret")
    try:
        with pytest.raises(HTTPStatusError) as caught:
            ChatClient(fake.url, max_retries=0).chat(TEXT_MODEL, _text_messages("hi"))
        assert caught.value.status == 401
        assert ChatClient(fake.url, api_key="s3cret").chat(TEXT_MODEL, _text_messages("hi")).content == "ok"
        assert ChatClient(fake.url, api_key="s3cret").list_models() == [TEXT_MODEL]
    finally:
        fake.stop()


def test_api_key_comes_from_the_environment_named_in_the_config(monkeypatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", "abc")
    client = ChatClient.from_config("http://127.0.0.1:9/v1", LLMConfig(api_key_env="MY_LLM_KEY", max_retries=7))
    assert client._api_key == "abc" and client.max_retries == 7
    monkeypatch.delenv("MY_LLM_KEY")
    assert ChatClient.from_config("http://127.0.0.1:9/v1", LLMConfig(api_key_env="MY_LLM_KEY"))._api_key is None


# --- faults ------------------------------------------------------------------------------------------------

def test_http_500_is_retried(server) -> None:
    server.faults({"match": "hello", "fault": "status:500", "times": 2})
    client = _client(server)
    assert client.chat(TEXT_MODEL, _text_messages("hello")).content == "ok"
    assert [e["fault"] for e in server.log()] == ["status:500", "status:500", None]
    assert client.pop_events() == {"http_500": 2, "retries": 2}


def test_persistent_5xx_gives_up_after_max_retries(server) -> None:
    server.faults({"match": "hello", "fault": "status:503", "times": None})
    client = _client(server, max_retries=2)
    with pytest.raises(RetriesExhausted) as caught:
        client.chat(TEXT_MODEL, _text_messages("hello"))
    assert isinstance(caught.value.last, HTTPStatusError) and caught.value.last.status == 503
    assert "gave up after 3 attempts" in str(caught.value)
    assert len(server.log()) == 3


def test_429_waits_as_long_as_retry_after_says(server) -> None:
    server.faults({"match": "hello", "fault": "status:429:1", "times": 1})
    client = _client(server, backoff_s=0.01)  # the header, not the backoff, sets the wait
    assert client.chat(TEXT_MODEL, _text_messages("hello")).content == "ok"
    first, second = server.log()
    assert first["fault"] == "status:429:1" and second["fault"] is None
    assert second["time"] - first["time"] >= 0.95


def test_retry_after_is_capped_by_backoff_max(server) -> None:
    waits: list[float] = []
    server.faults({"match": "hello", "fault": "status:429:3600", "times": 1})
    client = _client(server, backoff_max_s=0.5, sleep=waits.append)
    assert client.chat(TEXT_MODEL, _text_messages("hello")).content == "ok"
    assert waits == [0.5]


def test_slow_answer_past_the_deadline_is_abandoned_and_retried(server) -> None:
    server.faults({"match": "hello", "fault": "slow:30", "times": 1})
    client = _client(server, timeout_s=2.0)
    started = time.monotonic()
    assert client.chat(TEXT_MODEL, _text_messages("hello")).content == "ok"
    assert time.monotonic() - started < 15  # not the 30 s the server wanted
    assert client.pop_events()["timeouts"] >= 1
    assert [e["fault"] for e in server.log()][:2] == ["slow:30", None]


@pytest.mark.parametrize("fault", ["slow:30", "trickle:30"])
def test_nothing_hangs_even_when_every_attempt_is_too_slow(server, fault: str) -> None:
    """A server that never answers in time, or sends its answer a byte at a time: the deadline is hard."""
    server.faults({"match": "hello", "fault": fault, "times": None})
    client = _client(server, timeout_s=1.0, max_retries=1)
    started = time.monotonic()
    with pytest.raises(RetriesExhausted) as caught:
        client.chat(TEXT_MODEL, _text_messages("hello"))
    assert isinstance(caught.value.last, DeadlineExceeded)
    assert time.monotonic() - started < 8  # two 1 s attempts and a short backoff, not 60 s
    assert len(server.log()) == 2


@pytest.mark.parametrize("fault, event", [("invalid_json", "bad_response"), ("truncated_json", "connection_errors"),
                                          ("disconnect", "connection_errors")])
def test_broken_bodies_are_retried(server, fault: str, event: str) -> None:
    server.faults({"match": "hello", "fault": fault, "times": 1})
    client = _client(server)
    assert client.chat(TEXT_MODEL, _text_messages("hello")).content == "ok"
    assert client.pop_events() == {event: 1, "retries": 1}


@pytest.mark.parametrize("fault, error", [("invalid_json", BadResponse), ("truncated_json", TransportError)])
def test_broken_bodies_every_time_raise_a_clear_error(server, fault: str, error: type) -> None:
    server.faults({"match": "hello", "fault": fault, "times": None})
    with pytest.raises(RetriesExhausted) as caught:
        _client(server, max_retries=1).chat(TEXT_MODEL, _text_messages("hello"))
    assert isinstance(caught.value.last, error)


def test_connection_refused_is_retried_then_reported() -> None:
    from transforms.models.vllm_server import pick_free_port

    waits: list[float] = []
    client = ChatClient(f"http://127.0.0.1:{pick_free_port()}/v1", max_retries=3, backoff_s=0.5, backoff_max_s=1.0,
                        sleep=waits.append)
    with pytest.raises(RetriesExhausted) as caught:
        client.chat(TEXT_MODEL, _text_messages("hello"))
    assert isinstance(caught.value.last, TransportError)
    # Exponential backoff with jitter, capped: 0.5*2^k * U(0.5, 1), at most backoff_max_s.
    assert len(waits) == 3 and 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0 and waits[2] <= 1.0


# --- validated JSON output ----------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"subject": {"type": "string"}, "class_noun": {"type": "string"},
                                           "is_live": {"type": "boolean"},
                                           "captions": {"type": "array", "items": {"type": "string"}}},
          "required": ["subject", "class_noun", "is_live", "captions"]}


def _validate_subject(response: ChatResponse) -> dict[str, Any]:
    data = parse_json_object(response)
    if "class_noun" not in data:
        raise OutputInvalid("class_noun is missing")
    return data


def _subject_request() -> list[dict[str, Any]]:
    return _text_messages('Name the subject. Input: {"captions": ["a red teapot", "a teapot on a table"]}')


@pytest.mark.parametrize("fault, feedback", [("content_invalid_json", "not valid JSON"),
                                             ("content_truncated", "cut off"),
                                             ("content_wrong", "class_noun is missing")])
def test_invalid_output_is_asked_again_with_the_error_fed_back(server, fault: str, feedback: str) -> None:
    server.faults({"match": "Name the subject", "fault": fault, "times": 1})
    client = _client(server)
    data = client.chat_validated(TEXT_MODEL, _subject_request(), _validate_subject, validation_retries=2,
                                 **json_schema_params(SCHEMA, "cluster_subject", "response_format"))
    assert data["class_noun"] == "object" and len(data["captions"]) == 2
    first, second = server.log()
    assert first["fault"] == fault and second["fault"] is None
    assert (first["n_messages"], second["n_messages"]) == (2, 4)  # + the bad answer + the feedback
    assert client.pop_events() == {"invalid_output": 1}


def test_feedback_message_names_the_error_and_the_cut() -> None:
    from transforms.models.llm_client import feedback_message

    text = feedback_message(OutputInvalid("expected 3 captions, got 2"), ChatResponse("{", "length", None, {}))
    assert "expected 3 captions, got 2" in text and "cut off" in text


def test_output_that_stays_invalid_raises_after_the_validation_retries(server) -> None:
    server.faults({"match": "Name the subject", "fault": "content_invalid_json", "times": None})
    with pytest.raises(OutputInvalid, match="invalid after 3 attempts"):
        _client(server).chat_validated(TEXT_MODEL, _subject_request(), _validate_subject, validation_retries=2)
    assert len(server.log()) == 3


@pytest.mark.parametrize("mode, key", [("response_format", "response_format"), ("guided_json", "guided_json"),
                                       ("structured_outputs", "structured_outputs")])
def test_every_structured_output_mode_is_accepted(server, mode: str, key: str) -> None:
    params = json_schema_params(SCHEMA, "cluster_subject", mode)
    assert key in params
    data = _client(server).chat_validated(TEXT_MODEL, _subject_request(), _validate_subject, **params)
    assert data["class_noun"] == "object"
    assert json_schema_params(SCHEMA, "x", "none") == {}
    with pytest.raises(ValueError):
        json_schema_params(SCHEMA, "x", "xml")


def test_parse_json_object_accepts_a_code_fence_and_refuses_the_rest() -> None:
    assert parse_json_object(ChatResponse('```json\n{"a": 1}\n```', "stop", None, {})) == {"a": 1}
    with pytest.raises(OutputInvalid, match="cut off"):
        parse_json_object(ChatResponse('{"a": ', "length", None, {}))
    with pytest.raises(OutputInvalid, match="expected a JSON object"):
        parse_json_object(ChatResponse("[1, 2]", "stop", None, {}))


# --- concurrency ------------------------------------------------------------------------------------------

def test_concurrency_is_bounded_by_the_client() -> None:
    server = FakeOpenAIServer(TEXT_MODEL)  # its own: earlier tests leave slow requests running on the shared one
    try:
        server.faults({"match": "hello", "fault": "slow:0.3", "times": None})
        client = _client(server, max_concurrency=3)
        results = client.map_settled(lambda i: client.chat(TEXT_MODEL, _text_messages(f"hello {i}")).content,
                                     range(9))
        assert results == ["ok"] * 9
        assert max(e["in_flight"] for e in server.log()) == 3
        client.close()
    finally:
        server.stop()


def test_map_settled_returns_each_error_in_place(server) -> None:
    server.faults({"match": "hello 1", "fault": "status:400", "times": None})
    client = _client(server, max_concurrency=2)
    results = client.map_settled(lambda i: client.chat(TEXT_MODEL, _text_messages(f"hello {i}")).content, range(3))
    assert results[0] == "ok" and results[2] == "ok" and isinstance(results[1], HTTPStatusError)


def test_client_pickles_without_its_threads(server) -> None:
    import pickle

    client = _client(server)
    client.submit(lambda: None).result()
    copy = pickle.loads(pickle.dumps(client))
    assert copy.chat(TEXT_MODEL, _text_messages("hi")).content == "ok"


# --- small pieces ------------------------------------------------------------------------------------------

def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    now = time.time()
    assert 9 <= parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now=now) <= 11
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_image_data_url_reads_the_format_from_the_bytes(product_photos) -> None:
    image = Image.open(io.BytesIO(product_photos[0]))
    assert image_data_url(product_photos[0]).startswith("data:image/jpeg;base64,/9j/")
    for fmt, mime in (("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        assert image_data_url(buffer.getvalue()).startswith(f"data:image/{mime};base64,")
    with pytest.raises(ValueError):
        image_data_url(b"<svg/>")


@pytest.mark.parametrize("kwargs", [{"endpoint": "localhost:8000"}, {"request_timeout_s": 0}, {"max_retries": -1},
                                    {"backoff_s": 5, "backoff_max_s": 1}, {"max_concurrency": 0},
                                    {"server_args": {"m": "--enforce-eager"}}])
def test_llm_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LLMConfig(**kwargs)


# --- the vLLM server launcher --------------------------------------------------------------------------------

def test_vllm_command_line() -> None:
    cmd = vllm_server_command("Qwen/Qwen2.5-VL-7B-Instruct", 8123, {
        "max-model-len": 8192, "gpu-memory-utilization": 0.5, "enforce-eager": True, "trust-remote-code": False,
        "--limit-mm-per-prompt": {"image": 1}, "served-model-name": None}, python="/usr/bin/python3")
    assert cmd == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server",
                   "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--host", "127.0.0.1", "--port", "8123",
                   "--max-model-len", "8192", "--gpu-memory-utilization", "0.5", "--enforce-eager",
                   "--limit-mm-per-prompt", '{"image": 1}']


def _launch_fake_instead(commands: list[list[str]], processes: list[subprocess.Popen] | None = None):
    """Patch for ``vllm_server.start_process``: record the vLLM command, run the fake server with its arguments
    (recording the process in ``processes`` when given)."""
    real = vllm_server.start_process

    def start(cmd):
        commands.append(list(cmd))
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        process = real([sys.executable, str(FAKE_SERVER), *cmd[3:]])
        if processes is not None:
            processes.append(process)
        return process

    return start


def test_server_is_started_health_checked_and_killed_on_stop(monkeypatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(vllm_server, "start_process", _launch_fake_instead(commands))
    server = VLLMServer(TEXT_MODEL, {"max-model-len": 4096, "enforce-eager": True}, startup_timeout_s=30,
                        poll_interval_s=0.1).start()
    try:
        (cmd,) = commands
        port = cmd[cmd.index("--port") + 1]
        assert cmd[0] == sys.executable and cmd[cmd.index("--model") + 1] == TEXT_MODEL
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
        assert cmd[-3:] == ["--max-model-len", "4096", "--enforce-eager"]
        assert server.base_url() == f"http://127.0.0.1:{port}/v1"
        assert server.healthy()
        assert ChatClient(server.base_url()).chat(TEXT_MODEL, _text_messages("hi")).content == "ok"
    finally:
        server.stop()
    assert not server.healthy() and server.returncode() is None  # forgotten after stop


def test_server_that_never_becomes_healthy_is_killed_with_a_clear_error() -> None:
    hung = [sys.executable, "-c", "import time; print('loading weights...', flush=True); time.sleep(120)"]
    server = VLLMServer("some/model", command=hung, startup_timeout_s=1.5, poll_interval_s=0.2)
    started = time.monotonic()
    with pytest.raises(ServerStartError) as caught:
        server.start()
    message = str(caught.value)
    assert "did not become healthy within 1.5s" in message and "loading weights..." in message
    assert time.monotonic() - started < 20
    assert server.returncode() is None and server._process is None  # stopped


def test_server_that_exits_is_restarted_then_reported(monkeypatch) -> None:
    commands: list[list[str]] = []
    real = vllm_server.start_process
    crash = [sys.executable, "-c", "import sys; print('CUDA out of memory', flush=True); sys.exit(3)"]
    monkeypatch.setattr(vllm_server, "start_process", lambda cmd: commands.append(cmd) or real(crash))
    with pytest.raises(ServerStartError) as caught:
        VLLMServer("some/model", startup_timeout_s=30, poll_interval_s=0.1, start_attempts=2).start()
    assert "exited with code 3" in str(caught.value) and "CUDA out of memory" in str(caught.value)
    assert len(commands) == 2 and commands[0][commands[0].index("--port") + 1] != commands[1][
        commands[1].index("--port") + 1]


def test_server_serving_another_model_is_not_healthy() -> None:
    cmd = [sys.executable, str(FAKE_SERVER), "--model", "other/model", "--port", "{port}"]
    with pytest.raises(ServerStartError, match="serves \\['other/model'\\], not wanted/model"):
        VLLMServer("wanted/model", command=cmd, startup_timeout_s=2, poll_interval_s=0.1).start()


def test_connect_starts_one_shared_server_per_model_when_no_endpoint(monkeypatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(vllm_server, "start_process", _launch_fake_instead(commands))
    model = f"test/model-{uuid.uuid4().hex[:8]}"  # a fresh MultiProcessShared tag
    config = LLMConfig(server_args={model: {"max-model-len": 2048}}, server_startup_timeout_s=30)
    first = model_stage.connect(model, "", config)
    second = model_stage.connect(model, "", config)
    try:
        assert first.base_url == second.base_url and len(commands) == 1
        assert commands[0][-2:] == ["--max-model-len", "2048"]
        assert first.chat(model, _text_messages("hi")).content == "ok"
    finally:
        first.server.stop()
    # An endpoint in the config: no server at all.
    assert model_stage.connect(model, "", LLMConfig(endpoint="http://10.0.0.1:8000/v1")).base_url == (
        "http://10.0.0.1:8000/v1")
    assert model_stage.connect(model, "http://h:1/v1", LLMConfig(endpoint="http://10.0.0.1:8000/v1")).base_url == (
        "http://h:1/v1")
    assert len(commands) == 1


def test_stopped_process_is_really_gone(monkeypatch) -> None:
    started: list[subprocess.Popen] = []
    monkeypatch.setattr(vllm_server, "start_process", _launch_fake_instead([], started))
    server = VLLMServer(TEXT_MODEL, startup_timeout_s=30, poll_interval_s=0.1).start()
    server.stop()
    assert started[0].poll() is not None


def test_a_server_in_a_with_block_is_stopped_at_its_end(monkeypatch) -> None:
    started: list[subprocess.Popen] = []
    monkeypatch.setattr(vllm_server, "start_process", _launch_fake_instead([], started))
    with VLLMServer(TEXT_MODEL, startup_timeout_s=30, poll_interval_s=0.1) as server:
        assert server.healthy() and started[0].poll() is None
    assert started[0].poll() is not None and not server.healthy()
