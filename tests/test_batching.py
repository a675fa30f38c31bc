"""Continuous batching in `penwright serve` on penwright's engine, over real HTTP on loopback.

The tiny run is served as `penwright serve` loads it (its engine, int8). A `Recorder` around the
model's forward pass notes the shape of every call, (rows, tokens): one token per row is a decode
step, more is a chunk of a prefill; it can also slow each call down, so that the tests can act
while requests are under way.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import complete, sse_events

from conftest import serving
from penwright.config import ServeConfig
from penwright.serve import create_app, load_writers
from penwright.serve.batcher import Batcher


class Recorder:
    """Wraps `model.hidden`: records the tokens each call feeds to each slot (a packed step's segments,
    or a batch's rows) and sleeps `delay` seconds in it."""

    def __init__(self, model, delay: float = 0.0):
        self.inner, self.delay, self.calls = model.hidden, delay, []
        model.hidden = self

    def __call__(self, ids, step):
        segments = step.segments or [(None, None, ids.shape[1])] * ids.shape[0]
        self.calls.append([n for _, _, n in segments])
        time.sleep(self.delay)
        return self.inner(ids, step)

    def decodes(self) -> list[int]:
        """The rows of each pass that decoded any so far."""
        return [rows for rows in (sizes.count(1) for sizes in self.calls) if rows]

    def prompt_chunks(self) -> list[int]:
        """The size of every prompt chunk fed so far (a prompt of one token reads as a decode)."""
        return [n for sizes in self.calls for n in sizes if n > 1]


def server_for(tiny_run, delay: float = 0.0, **settings):
    """An app serving the tiny run as `penwright serve` does, its worker, and its model's Recorder."""
    cfg = ServeConfig(model=[f"tiny={tiny_run}"], precision="fp32", **settings)
    writers = load_writers(cfg, log=lambda *_: None)
    recorder = Recorder(writers["tiny"].model, delay)
    app = create_app(cfg, writers)
    return app, app.state.server.workers["tiny"], recorder


def ask(url, body) -> tuple[int, str]:
    """A request's status and text, streamed or not."""
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=60) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.text
        if body.get("stream"):
            return 200, "".join(e["choices"][0]["text"] for e in sse_events(response))
        response.read()
        return 200, response.json()["choices"][0]["text"]


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def batching(tiny_run):
    app, worker, recorder = server_for(tiny_run, delay=0.002, max_batch=8, prefill_chunk=8)
    with serving(app) as url:
        yield url, worker, recorder


SEEDED = {"prompt": "The ship", "max_tokens": 30, "seed": 7, "temperature": 0.9, "top_k": 20, "top_p": 0.95,
          "repetition_penalty": 1.3, "label": "scifi"}
OTHERS = [{"prompt": "She opened the door", "max_tokens": 40, "temperature": 1.2, "stream": True},
          {"prompt": "The detective", "max_tokens": 25, "temperature": 0, "stop": ["."]},
          {"prompt": " ".join(["a"] * 30), "max_tokens": 20, "top_p": 0.5, "seed": 3, "stream": True},
          {"prompt": "Once upon a time", "max_tokens": 35, "n": 2, "top_k": 5, "label": "horror"},
          {"prompt": "", "max_tokens": 30, "repetition_penalty": 2.0, "stream": True},
          {"prompt": "Nobody laughed", "max_tokens": 40, "temperature": 0.7, "seed": 99}]


def test_the_server_writes_with_penwrights_engine_and_int8(batching):
    from penwright.quantize import Int8Linear, int8_products

    url, worker, _ = batching
    assert isinstance(worker, Batcher)
    layers = [m for m in worker.writer.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all((m.packed is not None) == bool(int8_products()) for m in layers)  # int8 activations too
    health = httpx.get(f"{url}/health").json()["models"]["tiny"]
    assert health["max_batch"] == 8 and health["rows"] == 0


def test_a_seeded_request_writes_the_same_alone_and_beside_others(batching):
    url, _, recorder = batching
    alone = ask(url, SEEDED)
    assert alone[0] == 200 and alone[1]
    assert ask(url, {**SEEDED, "stream": True}) == alone
    assert ask(url, {**SEEDED, "seed": 8})[1] != alone[1]  # the seed matters

    recorder.calls.clear()
    with ThreadPoolExecutor(len(OTHERS) + 2) as pool:
        others = [pool.submit(ask, url, body) for body in OTHERS]
        time.sleep(0.05)  # the others are under way
        beside = [pool.submit(ask, url, SEEDED), pool.submit(ask, url, {**SEEDED, "stream": True})]
        assert [f.result()[0] for f in others] == [200] * len(OTHERS)
        assert [f.result() for f in beside] == [alone, alone]
    assert max(recorder.decodes()) >= 6, "the rows were not decoded together"


def test_a_stop_string_across_tokens_ends_the_row_where_it_begins(batching):
    url, worker, _ = batching
    tokenizer = worker.writer.tokenizer
    body = {"prompt": "The ship", "max_tokens": 30, "seed": 5, "temperature": 0.8}
    status, text = ask(url, body)
    ids = tokenizer.encode(text)
    for k in range(1, len(ids)):  # four characters across the end of token k, where they first occur
        at = len(tokenizer.decode(ids[:k]))
        stop = text[at - 2:at + 2]
        if len(stop) == 4 and text.find(stop) == at - 2 and stop.strip():
            break
    else:
        pytest.fail(f"no stop string to try in {text!r}")
    reply = complete(url, model="tiny", **body, stop=stop).json()["choices"][0]
    assert reply["text"] == text[:at - 2] and reply["finish_reason"] == "stop"
    assert ask(url, {**body, "stop": stop, "stream": True}) == (200, reply["text"])


def test_n_samples_of_a_prompt_prefill_it_once_and_sample_k_is_seed_plus_k(batching):
    url, _, recorder = batching
    body = {"model": "tiny", "prompt": "The ship", "max_tokens": 12, "seed": 7, "temperature": 0.9}
    recorder.calls.clear()
    texts = [c["text"] for c in complete(url, **body, n=3).json()["choices"]]
    assert len(recorder.prompt_chunks()) == 1  # one prefill for the three rows
    assert len(set(texts)) == 3
    assert [complete(url, **{**body, "seed": 7 + k}).json()["choices"][0]["text"] for k in range(3)] == texts


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(batching):
    url, worker, recorder = batching
    streaming = {"prompt": "The ship", "max_tokens": 50, "seed": 1, "stream": True}
    long = {"prompt": " ".join(["a"] * 45), "max_tokens": 4, "seed": 2}
    fed = 1 + len(worker.writer.tokenizer.encode(long["prompt"]))  # EOS, then the prompt
    recorder.calls.clear()
    recorder.delay = 0.01  # the stream's 50 steps outlast the long request's arrival
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, url, streaming)
            assert wait_for(lambda: len(recorder.decodes()) > 0)
            recorder.calls.clear()
            second = pool.submit(ask, url, long)
            assert first.result()[0] == second.result()[0] == 200
    finally:
        recorder.delay = 0.002
    assert recorder.prompt_chunks() == [8] * (fed // 8) + [fed % 8] * (fed % 8 > 0)
    chunks = [i for i, sizes in enumerate(recorder.calls) if max(sizes) > 1]
    between = recorder.calls[chunks[0]:chunks[-1] + 1]
    assert sum(sizes.count(1) for sizes in between) >= 5  # the stream went on writing meanwhile
    assert worker.health()["first_token_s"] > 0


def test_a_full_queue_answers_429_with_retry_after_and_the_rest_are_written(tiny_run):
    app, worker, recorder = server_for(tiny_run, delay=0.005, max_batch=8, max_queue=8)

    async def flood(url):
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            body = {"prompt": "The ship", "max_tokens": 20, "temperature": 0.8}
            return await asyncio.gather(*(client.post("/v1/completions", json={**body, "seed": i, "stream": i % 2 == 1})
                                          for i in range(200)))

    with serving(app) as url:
        replies = asyncio.run(flood(url))
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 8  # at least a queue's worth (requests the worker has not taken yet count)
        for refused in (r for r in replies if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"
        assert 6 <= max(recorder.decodes()) <= 8
        assert wait_for(lambda: worker.health()["rows"] == 0 and worker.queued == 0)
        assert complete(url, model="tiny", prompt="Still there?", max_tokens=4).status_code == 200


def test_clients_that_leave_and_requests_past_the_timeout_give_their_rows_back(tiny_run):
    app, worker, recorder = server_for(tiny_run, delay=0.02, timeout=1.0)
    body = {"model": "tiny", "prompt": "The ship", "max_tokens": 50, "seed": 11}
    with serving(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
            next(response.iter_lines())
        assert wait_for(lambda: worker.health()["rows"] == 0, 5)
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up after 0.3 s
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        assert wait_for(lambda: worker.health()["rows"] == 0, 5)
        assert len(recorder.decodes()) < 60  # two requests of 50 tokens were not written out
        late = complete(url, **body)  # 50 steps of 20 ms take longer than --timeout 1
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert wait_for(lambda: worker.health()["rows"] == 0, 5)
        assert complete(url, model="tiny", prompt="Still there?", max_tokens=2).status_code == 200


def test_the_context_limits_a_request_the_longest_prompt_is_written(batching):
    url, worker, _ = batching
    context = worker.writer.context  # the tiny run's 64-token block
    refused = complete(url, model="tiny", prompt="The ship", max_tokens=context)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert "max_tokens" in refused.json()["error"]["message"]
    prompt = " ".join(["a"] * (context - 3))
    longest = complete(url, model="tiny", prompt=prompt, max_tokens=1, seed=1)
    assert longest.status_code == 200 and longest.json()["usage"]["prompt_tokens"] == context - 3
    trimmed = complete(url, model="tiny", prompt=prompt, max_tokens=context - 2, temperature=0)
    assert trimmed.status_code == 200 and trimmed.json()["usage"]["completion_tokens"] >= 1
    assert complete(url, model="tiny", prompt=prompt + " a", max_tokens=1).status_code == 400


def test_each_slot_holds_the_longest_row_the_servers_limits_allow_not_the_whole_context(tiny_run):
    app, worker, _ = server_for(tiny_run, max_prompt_tokens=12, max_tokens_cap=10)
    assert worker.writer.context == 64 and worker.cache.length == 2 + 12 + 10  # EOS, a label, prompt, new tokens
    prompt = " ".join(["a"] * 12)
    with serving(app) as url:
        longest = complete(url, model="tiny", prompt=prompt, max_tokens=10, label="horror", seed=1)
        assert longest.status_code == 200 and longest.json()["usage"] == {"prompt_tokens": 12, "completion_tokens": 10,
                                                                          "total_tokens": 22}
        assert complete(url, model="tiny", prompt=prompt + " a", max_tokens=1).status_code == 400
        assert complete(url, model="tiny", prompt="The ship", max_tokens=11).status_code == 400


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny_run):
    app, worker, recorder = server_for(tiny_run)
    broken = threading.Event()
    inner = recorder.inner

    def sometimes(ids, step):
        if broken.is_set():
            broken.clear()
            raise RuntimeError("the step broke")
        return inner(ids, step)

    recorder.inner = sometimes
    with serving(app) as url:
        broken.set()
        failed = complete(url, model="tiny", prompt="The ship", max_tokens=8)
        assert failed.status_code == 500 and "the step broke" in failed.json()["error"]["message"]
        assert complete(url, model="tiny", prompt="The ship", max_tokens=8).status_code == 200
        assert worker.health()["rows"] == 0 and worker.cache.idle == list(range(worker.max_batch))


def test_the_web_page_and_health_still_answer_while_rows_write(batching):
    url, _, _ = batching
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(ask, url, {"prompt": "The ship", "max_tokens": 40, "stream": True}) for _ in range(3)]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(url, timeout=5).status_code == 200
        assert all(f.result()[0] == 200 for f in busy)
    assert json.loads(httpx.get(f"{url}/v1/models").text)["data"][0]["context_length"] == 64
