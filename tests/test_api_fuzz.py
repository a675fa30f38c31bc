"""A bounded fuzz of the HTTP API: requests hypothesis makes up, well-formed or not, never get a
5xx, and the server answers a fixed request the same way before and after them; one at a time,
and in bursts sent at once to a real server whose rows are batched together (and whose small
queue turns some away with 429).

The app has no OpenAPI schema to hand schemathesis (it serves none), so the requests are built
from the API's own field names with values of every type, plus raw bytes, odd paths and methods.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_batching import Recorder

from conftest import serving
from penwright import load
from penwright.config import ServeConfig
from penwright.serve import create_app

FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "stream_options", "top_k", "repetition_penalty", "label", "echo", "role", "content"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/", "/v1", "/v1/../health",
         "/static/../../etc/passwd", "/v1/completions/x", "/%00"]
KEY = "fuzz-key"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6),
                                                                 inner, max_size=4),
    max_leaves=10)
small = st.integers(-2, 6) | st.sampled_from([0.0, 0.5, 1.0, 2**63, -1e308, "", "tiny", "chatty", "horror"])
texts = st.text(max_size=60) | st.sampled_from(["Once", "<|genre=horror|>", "\x00", "word " * 50])
# Mostly near-valid requests, so that many pass the schema and reach the limits and the models.
near_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "chatty", "tiny", "nope", "../run"])},
    optional={"prompt": texts | st.lists(texts, max_size=3), "max_tokens": small, "temperature": small,
              "top_p": small, "n": small, "stop": texts | st.lists(texts, max_size=2), "seed": small,
              "stream": st.booleans(), "stream_options": json_values, "top_k": small, "repetition_penalty": small,
              "label": texts | st.sampled_from(["horror", "comedy"]), "echo": st.booleans(),
              "messages": st.lists(st.fixed_dictionaries({"role": texts, "content": texts}) | json_values, max_size=3)})
valid = st.fixed_dictionaries(  # requests the model writes, so that bursts fill the rows and the queue
    {"model": st.just("tiny"), "prompt": texts, "max_tokens": st.integers(1, 4)},
    optional={"stream": st.booleans(), "temperature": st.floats(0.1, 2.0), "seed": st.integers(0, 99),
              "n": st.integers(1, 3), "top_k": st.integers(0, 9), "stop": st.lists(st.text(min_size=1, max_size=3),
                                                                               max_size=2)}).map(json.dumps)
bodies = ((near_valid | st.dictionaries(st.sampled_from(FIELDS), small | json_values, max_size=7)).map(json.dumps)
          .map(str.encode) | json_values.map(json.dumps).map(str.encode) | st.binary(max_size=200))
headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "multipart/form-data", "\x7f"]),
    "authorization": st.sampled_from([f"Bearer {KEY}", "Bearer wrong", "", "Basic x"]),
    "content-length": st.sampled_from(["0", "5", "-1", "99999999999", "x"]),
})


def app_for(tiny_run, **limits):
    """The tiny run served as `penwright serve` serves it (penwright's engine, int8), plain and with a chat template."""
    writer = load(str(tiny_run), precision="fp32", device="cpu", log=lambda *_: None)
    chatty = load(str(tiny_run), precision="fp32", device="cpu", log=lambda *_: None)
    chatty.tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    cfg = ServeConfig(api_key=KEY, max_prompt_tokens=40, max_tokens_cap=4, max_body_bytes=2_000, timeout=20, **limits)
    return create_app(cfg, {"tiny": writer, "chatty": chatty})


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(app_for(tiny_run), raise_server_exceptions=False) as client:
        yield client


def fixed(client) -> dict:
    response = client.post("/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                           json={"model": "tiny", "prompt": "The house", "max_tokens": 4, "seed": 3})
    assert response.status_code == 200
    return response.json()["choices"]


def test_no_request_gets_a_server_error_and_nothing_changes(client):
    before, statuses = fixed(client), Counter()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE"]),
           path=st.sampled_from(["/v1/completions"] * 8 + ["/v1/chat/completions"] * 6 + PATHS),
           body=bodies, headers=headers, keyed=st.sampled_from([True] * 4 + [False]))
    def request(method, path, body, headers, keyed):
        if keyed:
            headers = {**headers, "authorization": f"Bearer {KEY}"}
        response = client.request(method, path, content=body, headers=headers)
        assert response.status_code < 500, (method, path, body[:200], response.status_code, response.text[:300])
        statuses[response.status_code] += 1

    request()
    print(f"\nAPI fuzz: {sum(statuses.values())} requests, answers {dict(sorted(statuses.items()))}")
    assert statuses[200] and statuses[400] and statuses[401]  # it reached the models and the refusals
    assert fixed(client) == before


def test_bursts_of_requests_at_once_get_no_server_error_and_nothing_changes(tiny_run):
    """Eight made-up requests at a time, each on its own connection, against --max-batch 4 and --max-queue 2."""
    statuses = Counter()
    app = app_for(tiny_run, max_batch=4, max_queue=2)
    Recorder(app.state.server.writers["tiny"].model, delay=0.005)  # each pass takes a while: a burst fills the queue
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(8) as pool:
        before = fixed(http)

        def send(body: bytes, stream_path: str) -> tuple[int, str]:
            headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
            with httpx.stream("POST", f"{url}{stream_path}", content=body, headers=headers, timeout=30) as response:
                return response.status_code, response.read().decode(errors="replace")

        paths = st.sampled_from(["/v1/completions"] * 3 + ["/v1/chat/completions"])

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(burst=st.lists(st.tuples(valid.map(str.encode) | bodies, paths), min_size=8, max_size=8))
        def burst(burst):
            for (status, text), (body, path) in zip(pool.map(lambda r: send(*r), burst), burst):
                assert status < 500, (path, body[:200], status, text[:300])
                assert "server_error" not in text, (path, body[:200], text[:300])  # nor inside a stream
                statuses[status] += 1

        burst()
        print(f"\nAPI fuzz in bursts: {sum(statuses.values())} requests, answers {dict(sorted(statuses.items()))}")
        assert statuses[200] and statuses[400] and statuses[429]
        assert fixed(http) == before
