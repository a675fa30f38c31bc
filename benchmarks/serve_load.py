"""Load test for `penwright serve`: 16 clients at once send 200 completion requests in all, on loopback.

    python benchmarks/serve_load.py                  # trains a tiny model first (a minute or two on a CPU)
    python benchmarks/serve_load.py --run runs/demo  # or serves a run dir you already have

Every fourth request streams. Writes benchmarks/results/serve_load.json and the serving section of
benchmarks/RESULTS.md; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sections import replace_section

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "src" / "penwright" / "data" / "sample_stories.csv"
PROMPTS = ["The ship", "She opened the door", "In the year 3000,", "The detective", "Once upon a time",
           "Nobody laughed when"]
START, END = "<!-- serve_load:start -->", "<!-- serve_load:end -->"


def tiny_run(folder: Path) -> Path:
    """A tiny GPT-2 trained from scratch on the built-in genre-labelled synopses."""
    from penwright import TrainConfig, train

    cfg = TrainConfig(data=str(SAMPLE), text_column="synopsis", label_column="genre", init="scratch",
                      preset="tiny", vocab_size=512, block_size=64, batch_size=8, max_steps=60, eval_every=0,
                      sample_every=0, save_every=0, precision="fp32", seed=1, out=str(folder / "run"),
                      cache_dir=str(folder / "cache"))
    return train(cfg, log=lambda *_: None)


def start_server(run: Path, args, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PENWRIGHT_API_KEY"}
    server = subprocess.Popen([sys.executable, "-m", "penwright", "serve", "--model", f"bench={run}",
                               "--host", "127.0.0.1", "--port", str(port), "--precision", "fp32",
                               "--batch-size", str(args.batch_size)], env=env, stdout=log, stderr=log)
    return server, f"http://127.0.0.1:{port}"


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not answer within {timeout:g} s")
        time.sleep(0.25)


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    stream = i % 4 == 3
    body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8}
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        if not stream:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens = response.json()["usage"]["completion_tokens"]
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    first = first or time.perf_counter() - start
                    if line == "data: [DONE]":
                        break
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                else:
                    raise RuntimeError("the stream ended without data: [DONE]")
        return {"ok": True, "stream": stream, "latency": time.perf_counter() - start, "first": first, "tokens": tokens}
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
        return {"ok": False, "stream": stream, "error": f"{type(e).__name__}: {e}"}


async def load(url: str, args) -> tuple[list[dict], float]:
    """`args.clients` loops share one iterator of request numbers, so exactly `args.requests` are sent."""
    numbers, results = iter(range(args.requests)), []
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def client_loop():
            for i in numbers:
                results.append(await one(client, i, args.max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        return results, time.perf_counter() - start


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 4)


def summarise(results: list[dict], wall: float, args, model: str, load_before: float) -> dict:
    import torch

    done = [r for r in results if r["ok"]]
    latency = [r["latency"] for r in done]
    first = [r["first"] for r in done if r["stream"]]
    tokens = sum(r["tokens"] for r in done)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model, "clients": args.clients, "requests": len(results), "errors": len(results) - len(done),
        "streamed": sum(r["stream"] for r in results), "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "wall_s": round(wall, 3), "requests_per_s": round(len(done) / wall, 2),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {p: percentile(latency, q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "first_token_s": {"p50": percentile(first, 50), "p99": percentile(first, 99)},
        "first_errors": [r["error"] for r in results if not r["ok"]][:5],
        "machine": {"cpus": os.cpu_count(), "load_average_before": round(load_before, 2),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"},
    }


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def write_results(summary: dict) -> None:
    from penwright import files

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    files.write_text(results / "serve_load.json", json.dumps(summary, indent=2) + "\n")
    s, lat, first = summary, summary["latency_s"], summary["first_token_s"]
    section = "\n".join([
        START, "## Serving under load (`make bench-serve`)", "",
        f"{s['clients']} concurrent clients sent {s['requests']} completion requests ({s['streamed']} streamed), "
        f"{s['max_tokens']} new tokens each at temperature 0.8, to `penwright serve` on loopback serving "
        f"{s['model']}; {s['machine']['cpus']} CPU cores (1-minute load average {s['machine']['load_average_before']} "
        f"before the run), {s['machine']['device']}, torch {s['machine']['torch']}, {s['date']}. "
        "Raw numbers: `benchmarks/results/serve_load.json`.", "",
        "| requests | errors | latency p50 | latency p99 | first token p50 (streams) | tokens/s | requests/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {s['requests']} | {s['errors']} | {seconds(lat['p50'])} | {seconds(lat['p99'])} | "
        f"{seconds(first['p50'])} | {s['tokens_per_s']} | {s['requests_per_s']} |", END,
    ])
    replace_section(START, END, section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run dir to serve (default: train a tiny model first)")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight at once (default: 16)")
    parser.add_argument("--requests", type=int, default=200, help="requests in all (default: 200)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="the server's --batch-size (default: 8)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="penwright-bench-") as tmp:
        if args.run:
            run, model = Path(args.run), f"`{args.run}`"
        else:
            print("training a tiny model ...", file=sys.stderr)
            run, model = tiny_run(Path(tmp)), "a tiny GPT-2 (4 layers, 128 wide) trained from scratch"
        with open(Path(tmp) / "server.log", "w+") as log:
            server, url = start_server(run, args, log)
            try:
                wait_ready(url, server)
                print(f"{args.clients} clients, {args.requests} requests against {url} ...", file=sys.stderr)
                load_before = os.getloadavg()[0]
                results, wall = asyncio.run(load(url, args))
            finally:
                server.terminate()
                server.wait(30)
            if any(not r["ok"] for r in results):
                log.seek(0)
                print(log.read()[-4000:], file=sys.stderr)
    summary = summarise(results, wall, args, model, load_before)
    write_results(summary)
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
