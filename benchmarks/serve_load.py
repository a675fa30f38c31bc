"""Load test for `penwright serve` (`make bench-serve`): many writers at once on GPT-2 124M's shape, on loopback.

    python benchmarks/serve_load.py                           # GPT-2 124M, random weights, the real vocabulary
    python benchmarks/serve_load.py --run runs/book           # or a run dir you have
    python benchmarks/serve_load.py --requests 100 --alone 8  # a shorter run
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 PENWRIGHT_CPU_BF16=0 \
        python benchmarks/serve_load.py --name cpu-avx2-imitated  # as on a CPU with AVX2 only

16 clients at once, each with its own sampling settings (temperature, top-k, top-p, repetition
penalty, seed), half of them streaming, send 500 completion requests in all; --alone requests of
the same kinds go one at a time, half before the load and half after, so that the ratio does not
hang on how fast a shared machine was in one window. Reports both runs' tokens/s and their ratio,
latency p50/p99, time to first token (the streams', as their clients see it, and the server's
median over all requests), errors, and the server's RSS after 50 requests and after all of them.
The vocabulary is GPT-2's (../shared/data/gpt2-tokenizer) when that folder is there, else a
byte-level BPE trained on the built-in synopses. Writes benchmarks/results/serve-<machine>.json and
that machine's section of benchmarks/RESULTS.md; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench import gpt2_124m, machine, machine_name
from sections import replace_section

HERE = Path(__file__).resolve().parent
SHARED = next((p for p in (HERE.parent.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
              HERE.parent.parent / "shared" / "data")  # beside the checkout, or the machine's shared folder
SAMPLE = HERE.parent / "src" / "penwright" / "data" / "sample_stories.csv"
WARM_UP = 4  # requests sent one at a time before anything is measured
PROMPTS = ["The ship", "She opened the door and saw", "In the year 3000,", "The detective looked at the letter",
           "Once upon a time", "Nobody laughed when the king"]


def settings_of(client: int) -> dict:
    """Client `client`'s own sampling settings: every client differs; odd ones stream, every third is seeded."""
    return {"temperature": round(0.6 + 0.05 * client, 2), "top_k": (0, 20, 40, 50)[client % 4],
            "top_p": (1.0, 0.9, 0.95)[client % 3], "repetition_penalty": (1.0, 1.1)[client // 2 % 2],
            **({"seed": client} if client % 3 == 0 else {}), "stream": client % 2 == 1}


def model_dir(folder: Path, tokenizer: Path) -> tuple[Path, str]:
    """GPT-2 124M with random weights, and words saying which vocabulary it has."""
    from penwright.tokens import load_tokenizer, train_tokenizer

    if (tokenizer / "vocab.json").is_file():
        return gpt2_124m(folder / "gpt2-124m", lambda: load_tokenizer(str(tokenizer))), "GPT-2's 50,257 tokens"
    import csv

    with open(SAMPLE, newline="") as f:
        texts = [row["synopsis"] for row in csv.DictReader(f)]
    return (gpt2_124m(folder / "gpt2-124m", lambda: train_tokenizer(texts, 8192)),
            f"a byte-level BPE of the built-in synopses ({tokenizer} is missing)")


def start_server(run: Path, args, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PENWRIGHT_API_KEY"}
    command = [sys.executable, "-m", "penwright", "serve", "--model", f"bench={run}", "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.clients * 4),
               *(["--threads", str(args.threads)] if args.threads else [])]
    return subprocess.Popen(command, env=env, stdout=log, stderr=log), f"http://127.0.0.1:{port}"


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def one(client: httpx.AsyncClient, number: int, who: int, max_tokens: int) -> dict:
    """Request `number` from client `who`, with that client's settings."""
    body = {"model": "bench", "prompt": PROMPTS[number % len(PROMPTS)], "max_tokens": max_tokens, **settings_of(who)}
    stream, start, first, tokens = body["stream"], time.perf_counter(), None, 0
    try:
        if not stream:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens = response.json()["usage"]["completion_tokens"]
        else:
            body["stream_options"] = {"include_usage": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        break
                    if not line:
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    if first is None and any(c.get("text") for c in event["choices"]):
                        first = time.perf_counter() - start
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                else:
                    raise RuntimeError("the stream ended without data: [DONE]")
        return {"ok": True, "number": number, "client": who, "stream": stream,
                "latency": time.perf_counter() - start, "first": first, "tokens": tokens}
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
        return {"ok": False, "number": number, "client": who, "stream": stream, "error": f"{type(e).__name__}: {e}"}


async def under_load(url: str, args, pid: int) -> tuple[list[dict], float, dict]:
    """`args.clients` clients share one iterator of request numbers, so exactly `args.requests` are sent;
    the server's RSS is read after 50 answers and after the last."""
    numbers, results, rss = iter(range(args.requests)), [], {"before": rss_mb(pid)}
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def client_loop(who: int):
            for number in numbers:
                results.append(await one(client, number, who, args.max_tokens))
                if len(results) == min(50, args.requests):
                    rss["after_50"] = rss_mb(pid)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(who) for who in range(args.clients)))
        wall = time.perf_counter() - start
    rss["after_all"] = rss_mb(pid)
    return results, wall, rss


async def alone(url: str, args, numbers: range) -> tuple[list[dict], float]:
    """Requests `numbers` one at a time, each with the prompt the load gives that number and the
    settings of client `number % clients`."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start, results = time.perf_counter(), []
        for number in numbers:
            results.append(await one(client, number, number % args.clients, args.max_tokens))
        return results, time.perf_counter() - start


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 4)


def figures(results: list[dict], wall: float) -> dict:
    done = [r for r in results if r["ok"]]
    latency, first = [r["latency"] for r in done], [r["first"] for r in done if r["first"] is not None]
    tokens = sum(r["tokens"] for r in done)
    return {"requests": len(results), "errors": len(results) - len(done), "streamed": sum(r["stream"] for r in results),
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99),
                          "max": percentile(latency, 100)},
            "first_token_s": {"p50": percentile(first, 50), "p99": percentile(first, 99)},
            "first_errors": [r["error"] for r in results if not r["ok"]][:5]}


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def write_results(report: dict) -> None:
    from penwright import files

    name, load, one_by_one, rss = report["name"], report["load"], report["alone"], report["rss_mb"]
    before, after = one_by_one["tokens_per_s_before_after"]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    files.write_text(results / f"serve-{name}.json", json.dumps(report, indent=2) + "\n")
    growth = rss["after_all"] / rss["after_50"] - 1
    row = "| {} | {} | {} | {} | {} | {} | {} | {} |"
    runs = ((report["clients"], load), (1, one_by_one))
    start, end = f"<!-- serve:{name}:start -->", f"<!-- serve:{name}:end -->"
    replace_section(start, end, "\n".join([
        start, f"## Serving many writers at once on {name} (`make bench-serve`)", "",
        f"{report['clients']} clients at once, each with its own sampling settings (temperature, top-k, top-p, "
        f"repetition penalty, a seed for every third), half of them streaming, sent {load['requests']} completion "
        f"requests of {report['max_tokens']} new tokens to `penwright serve --max-batch {report['max_batch']}` on "
        f"loopback, serving {report['model']} ({report['engine']}); {one_by_one['requests']} requests of the same "
        f"kinds went one at a time, half before the load and half after ({before} and {after} tokens/s). "
        f"{report['machine']['description']}; 1-minute load average "
        f"{report['load_average_before']} before the run, {report['machine']['date']}. Raw numbers: "
        f"`benchmarks/results/serve-{name}.json`.", "",
        "| clients | requests | errors | tokens/s | latency p50 | latency p99 | first token p50 (streams) "
        "| first token p99 (streams) |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(row.format(clients, f["requests"], f["errors"], f["tokens_per_s"], seconds(f["latency_s"]["p50"]),
                     seconds(f["latency_s"]["p99"]), seconds(f["first_token_s"]["p50"]),
                     seconds(f["first_token_s"]["p99"])) for clients, f in runs),
        "", f"Under load: **{report['ratio']}x** the tokens/s of one client at a time (target 4x); the server's "
            f"median time to first token over all requests {seconds(report['server_first_token_s'])}; server RSS "
            f"{rss['after_50']} MB after 50 requests, {rss['after_all']} MB after "
            f"{load['requests']} ({growth:+.1%}; target within 10%).", end]))


def measure(args, run: Path, log) -> dict:
    server, url = start_server(run, args, log)
    try:
        wait_ready(url, server)
        asyncio.run(alone(url, args, range(WARM_UP)))  # the first passes of each shape build oneDNN's kernels
        half = args.alone // 2
        print(f"{half} requests one at a time, then {args.clients} clients with {args.requests} requests "
              f"against {url}, then {args.alone - half} one at a time ...", file=sys.stderr)
        load_before = os.getloadavg()[0]
        before, before_wall = asyncio.run(alone(url, args, range(half)))
        sent, wall, rss = asyncio.run(under_load(url, args, server.pid))
        health = httpx.get(f"{url}/health").json()["models"]["bench"]
        after, after_wall = asyncio.run(alone(url, args, range(half, args.alone)))
    finally:
        server.terminate()
        server.wait(30)
    load, one_by_one = figures(sent, wall), figures(before + after, before_wall + after_wall)
    one_by_one["tokens_per_s_before_after"] = [figures(before, before_wall)["tokens_per_s"],
                                               figures(after, after_wall)["tokens_per_s"]]
    return {"load": load, "alone": one_by_one, "rss_mb": rss, "load_average_before": round(load_before, 2),
            "ratio": round(load["tokens_per_s"] / max(one_by_one["tokens_per_s"], 1e-9), 2),
            "server_first_token_s": health.get("first_token_s"),
            "engine": "penwright's engine, continuous batching" if "rows" in health else "transformers' engine"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run dir to serve (default: GPT-2 124M with random weights)")
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"), help="GPT-2 vocab.json + merges.txt")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight at once (default: 16)")
    parser.add_argument("--requests", type=int, default=500, help="requests in all (default: 500)")
    parser.add_argument("--alone", type=int, default=32,
                        help="requests sent one at a time, half before the load, half after (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default: 16)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: its own)")
    parser.add_argument("--name", help="results name (default: cpu-<isa> or gpu, as `make bench` names them)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE.parent / "src"))
    with tempfile.TemporaryDirectory(prefix="penwright-bench-") as tmp:
        if args.run:
            run, model = Path(args.run), f"`{args.run}`"
        else:
            print("building GPT-2 124M ...", file=sys.stderr)
            run, vocabulary = model_dir(Path(tmp), Path(args.tokenizer))
            model = f"GPT-2 124M with random weights and {vocabulary}"
        with open(Path(tmp) / "server.log", "w+") as log:
            report = measure(args, run, log)
            if report["load"]["errors"] or report["alone"]["errors"]:
                log.seek(0)
                print(log.read()[-4000:], file=sys.stderr)
    report = {"name": args.name or machine_name(), "model": model, "clients": args.clients,
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, **report, "machine": machine()}
    write_results(report)
    print(json.dumps(report, indent=2))
    return 1 if report["load"]["errors"] or report["alone"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
