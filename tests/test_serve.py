"""`penwright serve`: the OpenAI-compatible API over real HTTP on loopback, against the tiny run."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import serving
from penwright import load
from penwright.cli import main
from penwright.config import ServeConfig
from penwright.generate import Writer
from penwright.serve import create_app

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


class SlowWriter(Writer):
    """Streams one piece every 20 ms and records how its stream ended; batches take 0.5 s more."""

    pieces = 0
    finished = False
    closed: threading.Event

    def samples(self, *args, **kwargs):
        time.sleep(0.5)
        return super().samples(*args, **kwargs)

    def stream(self, *args, **kwargs):
        self.closed = threading.Event()
        pieces = super().stream(*args, **kwargs)
        try:
            while True:
                time.sleep(0.02)
                try:
                    piece = next(pieces)
                except StopIteration as end:
                    self.finished = True
                    return end.value
                self.pieces += 1
                yield piece
        finally:
            pieces.close()
            self.closed.set()


def writer_from(run, cls=Writer) -> Writer:
    """A writer on transformers' engine, which the server serves in batches and turns (worker.TurnWorker)."""
    plain = load(str(run), precision="fp32", device="cpu", log=lambda *_: None, engine="hf")
    return cls(plain.model, plain.tokenizer, log=plain.log)


def served(run) -> Writer:
    """A writer as `penwright serve` loads the run: penwright's engine and int8 (continuous batching)."""
    return load(str(run), precision="fp32", device="cpu", log=lambda *_: None)


@pytest.fixture(scope="module")
def slow(tiny_run):
    return writer_from(tiny_run, SlowWriter)


@pytest.fixture(scope="module")
def url(tiny_run, slow):
    chatty = served(tiny_run)
    chatty.tokenizer.chat_template = CHAT_TEMPLATE
    cfg = ServeConfig(max_prompt_tokens=50, max_tokens_cap=60, max_body_bytes=20_000, max_batch=4)
    app = create_app(cfg, {"tiny": served(tiny_run), "chatty": chatty, "slow": slow})
    with serving(app) as url:
        yield url


def complete(url, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


def sse_events(response) -> list:
    """The JSON events of a server-sent event stream (a response or its lines), checking it ends in [DONE]."""
    lines = [line for line in (response.iter_lines() if hasattr(response, "iter_lines") else response) if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


# --- completions --------------------------------------------------------------------------------

def test_completion_has_openai_shape_and_seed_repeats(url):
    body = dict(model="tiny", prompt="The ship", max_tokens=8, seed=1, temperature=0.9)
    first, again = complete(url, **body), complete(url, **body)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["object"] == "text_completion" and reply["model"] == "tiny"
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["text"]
    assert 1 <= reply["usage"]["completion_tokens"] <= 8 and reply["usage"]["prompt_tokens"] >= 1
    assert again.json()["choices"][0]["text"] == choice["text"]


def test_list_prompts_n_echo_label_and_greedy(url):
    reply = complete(url, model="tiny", prompt=["A", "B"], n=2, max_tokens=4, echo=True, label="horror").json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert [c["text"][0] for c in reply["choices"]] == ["A", "A", "B", "B"]
    greedy = [complete(url, model="tiny", prompt="She", max_tokens=6, temperature=0).json()["choices"][0]["text"]
              for _ in "ab"]
    assert greedy[0] == greedy[1]
    assert complete(url, model="tiny", prompt="She", max_tokens=4, temperature=1e-38).status_code == 200


def test_stream_is_server_sent_events_ending_in_done(url):
    body = dict(model="tiny", prompt="The ship", max_tokens=12, seed=3)
    streaming = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=streaming, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        *events, counted = sse_events(response)
    assert {e["object"] for e in events} == {"text_completion"}
    plain = complete(url, **body).json()
    assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "".join(e["choices"][0]["text"] for e in events) == plain["choices"][0]["text"]
    assert counted["choices"] == [] and counted["usage"] == plain["usage"]


def test_openai_client_plain_streamed_and_models(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny", "chatty", "slow"}
    plain = client.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=5,
                                      extra_body={"label": "scifi", "top_k": 20})
    assert plain.choices[0].text and plain.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=5, stream=True,
                                            extra_body={"label": "scifi", "top_k": 20}))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_chat_needs_a_chat_template(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    reply = client.chat.completions.create(model="chatty", messages=messages, max_tokens=6, seed=2)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="chatty", messages=messages, max_tokens=6, seed=2, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert refused.value.status_code == 400 and "chat template" in refused.value.message


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param, words", [
    (b'{"prompt": ', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "request body"),
    ({"model": "nope"}, 404, "model", "does not exist"),
    ({"model": "../../etc/passwd"}, 404, "model", "does not exist"),
    ({"temperature": -1}, 400, None, "temperature must be > 0"),
    ({"top_p": 0}, 400, None, "top_p must be in (0, 1]"),
    ({"n": 0}, 400, None, "n must be at least 1"),
    ({"seed": 2**64}, 400, None, "seed must be in [0, 2**63)"),
    ({"top_k": -3}, 400, None, "top_k"),
    ({"repetition_penalty": 0}, 400, None, "repetition_penalty"),
    ({"stop": [""]}, 400, None, "stop strings must not be empty"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"max_tokens": 61}, 400, "max_tokens", "--max-tokens-cap"),
    ({"label": "western"}, 400, "label", "unknown label"),
    ({"prompt": "word " * 60}, 400, "prompt", "at most 50"),
    ({"prompt": "x" * 30_000}, 413, None, "--max-body-bytes"),
])
def test_bad_requests_get_openai_errors(url, body, status, param, words):
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 4, **body}).encode()
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"] == param


def test_a_model_name_is_never_a_path(url, tiny_run):
    assert complete(url, model=str(tiny_run), prompt="Hi").status_code == 404


def test_unknown_paths_and_methods_answer_in_the_same_shape(url):
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"] == "Not Found"
    wrong = httpx.get(f"{url}/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_api_key_is_required_when_set(tiny_run):
    app = create_app(ServeConfig(api_key="s3cret"), {"tiny": writer_from(tiny_run)})
    with serving(app) as url:
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cre"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert httpx.get(f"{url}/health").json()["auth"] is True
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0).models.list()


# --- concurrency --------------------------------------------------------------------------------

def test_simultaneous_clients_all_get_answers(url):
    def ask(i):
        body = dict(model="tiny", prompt=f"Story {i}", max_tokens=8, stream=i % 3 == 0)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            if body["stream"]:
                return response.status_code, "".join(e["choices"][0]["text"] for e in sse_events(response))
            response.read()
            return response.status_code, response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(12)))
    assert [status for status, _ in answers] == [200] * 12
    assert sum(bool(text) for _, text in answers) >= 10  # a sample may end at once with end-of-text


def test_a_client_that_leaves_stops_its_stream(url, slow):
    body = dict(model="slow", prompt="The ship", max_tokens=60, seed=11, label="scifi")
    assert complete(url, **body).json()["choices"][0]["finish_reason"] == "length"  # 60 pieces if left alone
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        next(response.iter_lines())
    assert slow.closed.wait(5), "the stream was not closed after the client left"
    assert not slow.finished and slow.pieces < 40


class CountingWriter(Writer):
    """Takes 20 ms a token and counts the tokens it was asked to write."""

    steps = 0

    def _decode(self, *args, **kwargs):
        for step in super()._decode(*args, **kwargs):
            time.sleep(0.02)
            self.steps += 1
            yield step


def test_a_client_that_leaves_stops_its_plain_request(tiny_run):
    counting = writer_from(tiny_run, CountingWriter)
    body = {"prompt": "The ship", "max_tokens": 60, "seed": 11, "label": "scifi"}
    with serving(create_app(ServeConfig(), {"counting": counting})) as url:
        assert complete(url, **body).json()["choices"][0]["finish_reason"] == "length"  # 60 tokens if left alone
        assert counting.steps == 60
        counting.steps = 0
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s and closes the connection
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        time.sleep(1.5)  # what 60 tokens would take, and more
        assert 0 < counting.steps < 40, counting.steps


def test_streams_take_turns(tiny_run):
    slow = writer_from(tiny_run, SlowWriter)
    body = {"prompt": "The ship", "max_tokens": 60, "seed": 11, "label": "scifi", "stream": True}
    with serving(create_app(ServeConfig(), {"slow": slow})) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as first:
            first_lines = first.iter_lines()  # kept: dropping a half-read iterator closes the connection
            next(first_lines)
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as second:
                second_lines = second.iter_lines()
                next(second_lines)
                assert not slow.finished  # the second stream began while the first was still being written
                assert httpx.get(f"{url}/health").json()["models"]["slow"]["streaming"] == 2
                assert sse_events(second_lines) and sse_events(first_lines)  # both finish, ending in [DONE]


def test_requests_past_the_timeout_are_abandoned(tiny_run):
    slow = writer_from(tiny_run, SlowWriter)
    body = {"prompt": "The ship", "max_tokens": 60, "seed": 11, "label": "scifi"}
    with serving(create_app(ServeConfig(timeout=0.3), {"slow": slow})) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
            *_, error, done = [line for line in response.iter_lines() if line]
        assert done == "data: [DONE]" and json.loads(error[6:])["error"]["code"] == "timeout"
        assert slow.closed.wait(5) and not slow.finished
        late = complete(url, **body)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"


def test_serve_command_builds_the_server_from_flags(tiny_run, monkeypatch, capsys):
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: started.update(app=app, **settings))
    monkeypatch.delenv("PENWRIGHT_API_KEY", raising=False)
    assert main(["serve", "--model", f"mine={tiny_run}", "--port", "8123", "--precision", "fp32"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    with serving(started["app"]) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["mine"] and "horror" in models[0]["labels"]
    assert main(["serve", "--max-tokens-cap", "0"]) == 2
    assert "--max-tokens-cap must be at least 1" in capsys.readouterr().err
