"""The no-key default: the gateway starts its own llama.cpp server with the real SmolLM2 model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.servers import TODAYS_CHAT_MESSAGES, running, start_gateway


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    # The shipped default config, as `make serve` runs it, but with a small context and 1 thread.
    # PORT and HOST in the environment (as `make serve PORT=...` exports them) must not reach the model
    # server, which would read them as its own settings and take the gateway's port.
    with running(start_gateway(tmp, {"local_model": {"enabled": True, "n_ctx": 1024, "n_threads": 1}},
                               timeout=120, name="local", env={"PORT": "1", "HOST": "0.0.0.0"})) as gateway:
        yield gateway


def test_default_policy_serves_real_answers_from_the_local_model(local_gateway):
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    assert {"auto", "local"} <= {m.id for m in client.models.list()}
    completion = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, seed=1, temperature=0)
    text = completion.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert 0 < completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0


def test_local_model_streams_through_the_gateway(local_gateway):
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    # The backend by name: `auto` may explore a voting arm (10% in the local policy), which streams a
    # synthesized answer with exact usage instead of passing llama.cpp's stream through.
    chunks = list(client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, seed=2, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    # llama.cpp sends no usage on streams: one content chunk is one token, and the gateway says so
    assert usage is not None and 0 < usage.completion_tokens <= 8
    assert chunks[-1].model_extra["ponder"]["usage_estimated"] is True


def test_the_responses_api_is_answered_by_the_local_model(local_gateway):
    """`client.responses.create` (the OpenAI Agents SDK's default) against the real model, whole and
    streamed: the Responses body is translated into the chat request llama.cpp's server takes."""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    response = client.responses.create(model="local", instructions="Be brief.", input="Say hello.",
                                       max_output_tokens=12, temperature=0)
    assert response.output_text.strip() and response.status in ("completed", "incomplete")
    assert 0 < response.usage.output_tokens <= 12 and response.usage.input_tokens > 0
    events = list(client.responses.create(model="local", input=[{"role": "user", "content": "Hi!"}],
                                          max_output_tokens=8, stream=True))
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete") and last.response.output_text.strip()
    assert last.response.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert 0 < last.response.usage.output_tokens <= 8


def test_todays_chat_format_reaches_the_basic_local_model(local_gateway):
    """llama.cpp's server answers a 500 to content parts, a `developer` turn or a tool-calling assistant
    turn without content: the gateway sends them in the basic format it takes, and refuses images."""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    completion = client.chat.completions.create(model="local", messages=TODAYS_CHAT_MESSAGES, max_tokens=8, seed=4)
    assert completion.choices[0].message.content.strip()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="local", max_tokens=8,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}])
    assert refused.value.code == "unsupported_content"
    # the refusal was about that request: the model still answers the next one
    assert client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, seed=5).choices[0].message.content is not None


def test_the_local_model_takes_what_todays_sdk_sends(local_gateway):
    """What an ordinary app sends through the openai SDK: a kept assistant turn as the SDK dumps it
    (`"tool_calls": null`, which llama.cpp's server failed on with a 500), an argument given as None
    (`"temperature": null`, a 500 too), and max_completion_tokens (ignored there: it wrote on)."""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "Say hi."}]
    first = client.chat.completions.create(model="local", messages=question, max_completion_tokens=4, seed=6,
                                           temperature=None)
    assert 0 < first.usage.completion_tokens <= 4
    history = [*question, first.choices[0].message.model_dump(), {"role": "user", "content": "Tell me a long story."}]
    second = client.chat.completions.create(model="local", messages=history, max_completion_tokens=6, seed=7)
    assert second.choices[0].message.content and 0 < second.usage.completion_tokens <= 6


def test_the_local_model_answers_structured_outputs(local_gateway):
    """`client.chat.completions.parse(response_format=Model)` sends a json_schema response_format, which
    llama-cpp-python refuses (a 500, the backend cooled down): it gets the schema as json_object + schema."""
    from pydantic import BaseModel

    class Sum(BaseModel):
        answer: int

    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    completion = client.chat.completions.parse(model="local", response_format=Sum, max_completion_tokens=40, seed=8,
                                               messages=[{"role": "user", "content": "What is 2 + 3?"}])
    assert isinstance(completion.choices[0].message.parsed, Sum)


def test_a_streamed_tool_call_of_the_local_model_is_one_call(local_gateway):
    """llama-cpp-python streams a tool call with its id and name repeated in every delta: the SDK's stream
    helper joined them into a call to 'get_weatherget_weather...'. It gets them once, as OpenAI sends."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    asked = dict(model="local", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[weather],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=30, seed=1)
    with client.chat.completions.stream(**asked) as events:
        streamed = events.get_final_completion().choices[0].message.tool_calls
    whole = client.chat.completions.create(**asked).choices[0].message.tool_calls
    assert len(streamed) == len(whole) == 1 and streamed[0].function.name == "get_weather"
    assert streamed[0].id.startswith("call_") and len(streamed[0].id) == len(whole[0].id)
    assert isinstance(json.loads(streamed[0].function.arguments), dict)


def test_a_required_tool_call_of_the_local_model_is_a_tool_call(local_gateway):
    """llama-cpp-python ignores `tool_choice: "required"` and answered text, though OpenAI's API
    guarantees a tool call: with one tool the gateway names it, which the server does force."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    choice = client.chat.completions.create(model="local", tools=[weather], tool_choice="required", max_tokens=30,
                                            seed=1, messages=[{"role": "user", "content": "What is the weather in Paris?"}]
                                            ).choices[0]
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather", choice


def test_local_model_votes_on_a_math_question(local_gateway):
    """A multi-sample strategy on the real model: every sample is a real call and is counted."""
    response = httpx.post(local_gateway.url + "/v1/chat/completions", timeout=120, json={
        "model": "local", "messages": [{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
        "max_tokens": 24, "seed": 3}, headers={"x-ponder-strategy": "self_consistency"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["message"]["content"]


def test_a_call_the_client_left_keeps_the_local_models_slot_until_the_model_is_done(local_gateway):
    """llama-cpp-python writes a non-streamed answer to its end after the gateway stopped waiting for it.
    The slot stays taken meanwhile: a request queued behind it whose client leaves too was never sent
    (nothing billed), where it used to be sent at once into a busy server and billed as cut off."""
    import asyncio

    url = local_gateway.url + "/v1/chat/completions"
    # 900 tokens, the end of the answer banned: seconds of writing after its client left
    endless = {"model": "local", "max_tokens": 900, "logit_bias": {"2": -100, "0": -100},
               "messages": [{"role": "user", "content": "Write a very long story."}]}

    async def leaves(after_s: float, wait_s: float) -> None:
        await asyncio.sleep(after_s)
        async with httpx.AsyncClient(timeout=wait_s) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(url, json=endless)

    async def both() -> None:
        await asyncio.gather(leaves(0, 1.5), leaves(1.7, 1.0))

    asyncio.run(both())
    time.sleep(0.3)  # the second request is recorded once its handler has unwound
    first, second = sorted((r for r in httpx.get(local_gateway.url + "/v1/ponder/requests").json()["requests"]
                            if r["status"] == 499), key=lambda r: r["ts"])[-2:]
    calls = httpx.get(f"{local_gateway.url}/v1/ponder/requests/{second['request_id']}").json()["execution"]["calls"]
    assert [c["error"] for c in calls] == ["cancelled while queued for a free slot: never sent"]
    assert second["prompt_tokens"] == 0 < first["prompt_tokens"]
    answer = httpx.post(url, json={"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                        timeout=120)  # served once the model is done with the abandoned answer
    assert answer.status_code == 200


def test_gateway_stops_its_local_model(tmp_path):
    import psutil

    gateway = start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                            timeout=120, name="stop")
    children = psutil.Process(gateway.process.pid).children(recursive=True)
    assert any("llama_cpp.server" in " ".join(c.cmdline()) for c in children)
    gateway.stop()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_a_dead_model_server_is_reported_and_restarted(tmp_path):
    """The llama.cpp child dies (here: SIGKILL): readiness says so at once, the gateway logs it and
    starts a new one on the same port, and answers come back; stopping the gateway leaves no child."""
    import os
    import signal
    import time

    import psutil

    with running(start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                               timeout=120, name="revive", log_level="info")) as gateway:
        (child,) = psutil.Process(gateway.process.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGKILL)
        seen_down = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = httpx.get(gateway.url + "/readyz")
            seen_down = seen_down or (ready.status_code == 503 and ready.json()["local_model"] is False)
            if seen_down and ready.status_code == 200:
                break
            time.sleep(0.05)
        assert seen_down and ready.status_code == 200, ready.text
        assert "local model server exited with -9; restarting it" in gateway.log()
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, seed=1)
        assert answer.choices[0].message.content is not None
        (revived,) = psutil.Process(gateway.process.pid).children(recursive=True)
        assert revived.pid != child.pid
    assert not psutil.pid_exists(revived.pid) or revived.status() == psutil.STATUS_ZOMBIE


def test_a_stopped_model_server_is_replaced_and_its_calls_fail_fast(tmp_path):
    """The llama.cpp child is stopped (SIGSTOP): alive, holding its port, answering nothing. A call sent
    to it fails once the stop outlasts its grace (it hung for its whole 120 s timeout), readiness says
    the model is down, and a new server answers; the stopped one is gone."""
    import os
    import signal
    import time

    import psutil

    with running(start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                               timeout=120, name="stopped", log_level="info")) as gateway:
        (child,) = psutil.Process(gateway.process.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGSTOP)
        try:
            body = {"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1}
            started = time.monotonic()
            failed = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)
            assert time.monotonic() - started < 20
            assert failed.status_code == 502, failed.text
            assert httpx.get(gateway.url + "/readyz").json()["local_model"] is False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and httpx.get(gateway.url + "/readyz").status_code != 200:
                time.sleep(0.2)
            answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert "local model server has been stopped (SIGSTOP)" in gateway.log()
            assert not child.is_running()
        finally:
            if child.is_running():
                child.resume()


def test_the_model_server_dies_with_a_killed_gateway(tmp_path):
    """SIGKILL of the gateway runs no shutdown: the kernel's parent-death signal stops the model server
    anyway, instead of leaving an orphan holding its port and memory."""
    import os
    import signal

    import psutil

    gateway = start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                            timeout=120, name="orphan")
    try:
        (child,) = psutil.Process(gateway.process.pid).children(recursive=True)
        os.kill(gateway.process.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert child in gone, f"model server {child.pid} outlived its gateway"
    finally:
        gateway.stop()


def _serve_refused(tmp_path, local_model: dict):
    """`ponder serve` with this local model config, in a subprocess that must give up before starting."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "ponder.yaml"
    path.write_text(yaml.safe_dump({"local_model": local_model, "telemetry": {"data_dir": str(tmp_path / "data")}}))
    return subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", "9"],
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_missing_model_file(tmp_path):
    done = _serve_refused(tmp_path, {"model_path": str(tmp_path / "nowhere.gguf")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ponder: bad config: local_model.model_path: {tmp_path / 'nowhere.gguf'} is not a file"]


def test_serve_without_llama_cpp_names_the_extra_that_installs_it(tmp_path):
    """`pip install ponder` without the `local` extra, then `ponder serve`: the refusal pointed at
    scripts/install.sh, which an installed package does not have; it names the extra."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "ponder.yaml"
    path.write_text(yaml.safe_dump({"telemetry": {"data_dir": str(tmp_path / "data")}}))
    hide_llama_cpp = ("import sys; sys.modules['llama_cpp'] = None; from gateway.cli import main; "
                      f"raise SystemExit(main(['serve', '--config', {str(path)!r}, '--port', '9']))")
    done = subprocess.run([sys.executable, "-c", hide_llama_cpp], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "ponder: bad config: llama-cpp-python is not installed: install ponder with its `local` extra "
        "(pip install 'ponder[local]', or scripts/install.sh in a checkout)"]


def test_a_model_file_llama_cpp_cannot_load_is_reported_in_a_line_not_two_tracebacks(tmp_path):
    """The file exists but is no model (a download page saved as .gguf, a truncated file): the model
    server exits at start. The operator reads why, as for a bad config, not Starlette's traceback of
    the startup wrapped around llama-cpp-python's own."""
    (tmp_path / "page.gguf").write_text("<html>Not found</html>")
    done = _serve_refused(tmp_path, {"model_path": str(tmp_path / "page.gguf")})
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert ("ponder: the local model did not start: local model server exited with 1: "
            f"ValueError: Failed to load model from file: {tmp_path / 'page.gguf'}") in done.stderr


def test_a_relative_model_path_is_found_in_the_configs_folder(tmp_path):
    """`model_path: page.gguf` beside the config was looked for in the current directory (here the
    checkout), as `bad config ... is not a file`; relative paths in a config are the config folder's."""
    (tmp_path / "page.gguf").write_text("<html>Not found</html>")
    done = _serve_refused(tmp_path, {"model_path": "page.gguf"})
    assert done.returncode == 3 and "bad config" not in done.stderr, done.stderr
    assert f"Failed to load model from file: {tmp_path / 'page.gguf'}" in done.stderr


def test_serve_refuses_a_local_model_port_another_process_holds(tmp_path):
    """Else the other process's server answers the readiness probe (for a second gateway sharing one
    config: the first one's model server) while our model server exits, restarted every second."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = _serve_refused(tmp_path, {"port": port})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ponder: bad config: local_model.port: 127.0.0.1:{port} is already in use by another process"]


def test_a_model_server_port_taken_while_it_was_down_is_not_reported_as_back(tmp_path):
    """The model server dies and another HTTP server takes its port: the watchdog says it cannot restart
    there (and keeps trying, slower and slower) instead of taking the other server's answer to its
    readiness probe for its own model server being back."""
    import http.server
    import os
    import signal
    import threading
    import time

    import psutil

    class Answers200(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    with running(start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                               timeout=120, name="taken", log_level="info")) as gateway:
        port = int(gateway.log().split("on port ")[1].split()[0])
        (child,) = psutil.Process(gateway.process.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:  # at once: the watchdog looks every second, and a new model server binds seconds later
            try:
                squatter = http.server.HTTPServer(("127.0.0.1", port), Answers200)
                break
            except OSError:
                assert time.monotonic() < deadline
        threading.Thread(target=squatter.serve_forever, daemon=True).start()
        try:
            time.sleep(5)
            ready = httpx.get(gateway.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["local_model"] is False
            assert f"did not restart (port {port} on 127.0.0.1 is in use by another process)" in gateway.log()
            assert "is back" not in gateway.log()
            assert gateway.log().count("starting local model") <= 4  # the first start, then 1, 2, 4 s apart
        finally:
            squatter.shutdown()
            squatter.server_close()
        deadline = time.monotonic() + 60  # the port is free again: a later try brings the model back
        while time.monotonic() < deadline and httpx.get(gateway.url + "/readyz").status_code != 200:
            time.sleep(0.2)
        assert httpx.get(gateway.url + "/readyz").status_code == 200
        assert "local model server is back" in gateway.log()


def test_requests_are_served_as_soon_as_a_restarted_model_server_is_ready(tmp_path):
    """Requests sent while the model server is down fail and cool its backend down (fail fast, not
    wait); once readiness says it is back, the next request is answered, not refused with a 503 for
    whatever that cool-down had left to run."""
    import os
    import signal
    import time

    import psutil

    with running(start_gateway(tmp_path, {"local_model": {"enabled": True, "n_ctx": 512, "n_threads": 1}},
                               timeout=120, name="back")) as gateway:
        (child,) = psutil.Process(gateway.process.pid).children(recursive=True)
        os.kill(child.pid, signal.SIGKILL)
        body = {"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1}
        refused = 0
        deadline = time.monotonic() + 60
        while httpx.get(gateway.url + "/readyz").status_code != 200:  # clients keep asking meanwhile
            assert time.monotonic() < deadline
            refused += httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30).status_code >= 500
            time.sleep(0.02)
        assert refused >= 2  # enough failures in a row to cool the backend down
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text


def test_a_prompt_longer_than_the_context_is_a_400_with_openais_code(local_gateway):
    """llama.cpp's server says so in OpenAI's words and code; clients that trim their history on
    `context_length_exceeded` must see that code, not a generic one. (A prompt this close to the window
    is sent: the gateway's estimate, 1379 tokens, may be over the real count.)"""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="local", max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 1100}])
    assert refused.value.code == "context_length_exceeded"
    assert "local: upstream 400: This model's maximum context length is 1024 tokens" in refused.value.message


def test_a_streamed_prompt_longer_than_the_context_is_a_400_and_cools_nothing_down(local_gateway):
    """llama-cpp-python answers such a stream 200, then drops it: that was a 502, and two of them cooled
    the local model down for everyone. A prompt clearly over the window (3000 words) is refused before
    any call; one that may fit (1100 words) is sent, and when its stream breaks, one call without
    streaming gets the server's own 400. Neither counts against the backend."""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key="none", max_retries=0)
    for words, says in ((3000, "(estimated)"), (1100, "local: upstream 400")):
        for _ in range(2):
            with pytest.raises(openai.BadRequestError) as refused:
                list(client.chat.completions.create(model="local", max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": "word " * words}]))
            assert refused.value.code == "context_length_exceeded" and says in refused.value.message
            assert "maximum context length is 1024 tokens" in refused.value.message
    # routed too: every arm of the local policy runs on the local model
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="auto", max_tokens=8, messages=[{"role": "user", "content": "word " * 3000}])
    assert refused.value.code == "context_length_exceeded"
    chunks = list(client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, seed=1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
