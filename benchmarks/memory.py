"""What gradient checkpointing costs and buys: peak memory and tokens/s of penwright's training step for
GPT-2 124M's and gpt2-medium's shapes, with and without it, and the micro-batch --batch-size auto
finds for each within one memory budget.

    python benchmarks/memory.py                                  # small and medium, 4 steps each
    python benchmarks/memory.py --presets small --steps 3 --no-auto   # a reduced run

The models have GPT-2's shapes and vocabulary (the tokenizer from ../shared/data/gpt2-tokenizer when
present, else a BPE trained on the data) with random weights: memory and speed do not depend on the
weights, and nothing is downloaded. Each measurement runs in its own process (`--one`), built by
penwright's own `training.setup`, so that its peak is its own: on CPU the peak resident memory
of the training steps (counted from just before the first), on CUDA the peak allocated by PyTorch.
Writes benchmarks/results/memory-<isa>.json (memory-cuda.json on a GPU) and a table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import replace_section

HERE = Path(__file__).resolve().parent
SHARED = next((p for p in (HERE.parent.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
              HERE.parent.parent / "shared" / "data")  # beside the checkout, or the machine's shared folder
SAMPLE = HERE.parent / "src" / "penwright" / "data" / "sample_stories.csv"
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
# Sequences per optimizer step: "probe" lets --batch-size auto try 1, 2 and 4 within the machine's memory (from 2
# to 4, what each more sequence costs, once the loss's 1,024-token chunk of logits has stopped growing), "auto"
# lets it find how many of up to 16 fit --budget; "fixed" is --batch-size with no accumulation.
SEQUENCES = {"fixed": None, "probe": 4, "auto": 16}


def config(args, preset: str, checkpointing: str, folder: Path, batch="fixed"):
    from penwright import TrainConfig

    data = Path(args.data) if Path(args.data).is_file() else SAMPLE
    tokenizer = args.tokenizer if Path(args.tokenizer).is_dir() else None
    return TrainConfig(data=str(data), text_column="synopsis" if data.suffix == ".csv" else "text",
                       out=str(folder / f"{preset}-{checkpointing}-{batch}"), init="scratch", preset=preset,
                       tokenizer=tokenizer, block_size=args.block_size,
                       batch_size=args.batch_size if batch == "fixed" else "auto",
                       memory_limit=args.budget if batch == "auto" else None,
                       tokens_per_step=args.block_size * SEQUENCES[batch] if SEQUENCES[batch] else None,
                       max_steps=args.steps,
                       eval_every=0, eval_batches=1, sample_every=0, save_every=0, val_fraction=0.01,
                       gradient_checkpointing=checkpointing, cache_dir=str(folder / "cache"), seed=1)


def measure_one(args) -> dict:
    """In this process: build the run with `training.setup`, then time `--steps` optimizer steps."""
    import torch

    from penwright import distributed, memory, training
    from penwright.devices import pick_device

    preset, checkpointing, batch = args.one.split(",")
    cfg = config(args, preset, checkpointing, Path(args.folder), batch)
    from penwright.errors import PenwrightError

    ranks, device = distributed.setup(pick_device("auto"))
    try:
        t = training.setup(cfg, ranks, device, log=lambda *_: None)
    except PenwrightError as e:
        if batch != "auto":
            raise
        return {"refused": str(e)}  # --batch-size auto's answer: not one sequence fits the budget
    vocab = t.model.get_input_embeddings().num_embeddings
    if batch == "probe":  # only the trials are wanted here
        peaks = t.plan.measured["peaks"]
        if "4" not in peaks:
            sys.exit(f"4 sequences do not fit this machine's memory: only {sorted(peaks)} were tried")
        return {"per_sequence_mib": round((peaks["4"] - peaks["2"]) / 2 / 2**20)}
    if batch == "auto":  # only the choice is wanted here
        return {"batch_size": t.cfg.batch_size, "grad_accum": t.cfg.grad_accum, "checkpointing": t.plan.checkpointing}
    resident = memory._status("VmRSS")
    memory.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, _ = training.train_step(t, cfg.peak_lr)
        loss.item()  # wait for the step
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory.peak_rss()
    tokens = cfg.batch_size * cfg.block_size
    return {"peak_mib": round(peak / 2**20), "resident_before_mib": round(resident / 2**20),
            "tokens_per_s": round(tokens / statistics.median(times[1:] or times), 1),
            "step_s": [round(s, 2) for s in times],
            "final_loss": round(loss.item() / cfg.grad_accum, 4), "device": str(device), "dtype": str(t.dtype),
            "vocab": vocab, "parameters": sum(p.numel() for p in t.model.parameters())}


def run(args, preset: str, checkpointing: str, folder: Path, batch: str = "fixed") -> dict:
    argv = [sys.executable, __file__, "--one", f"{preset},{checkpointing},{batch}", "--folder", str(folder),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
            "--data", args.data, "--tokenizer", args.tokenizer, "--budget", args.budget]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{preset} {checkpointing} {batch} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{preset:>6} checkpointing {checkpointing:>3} {batch}: {result} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return result


def auto_choice(auto: dict) -> str:
    return "none fits (refused)" if "refused" in auto else f"{auto['batch_size']} x {auto['grad_accum']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small,medium", help="model shapes: small (GPT-2 124M), medium (355M)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps (the first warms up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--budget", default="8G", help="the memory budget for the --batch-size auto comparison")
    parser.add_argument("--no-auto", action="store_true", help="skip the --batch-size auto comparison")
    parser.add_argument("--data", default=str(SHARED / "tinyshakespeare.txt"))
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.one:
        print(json.dumps(measure_one(args)))
        return
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            results[preset] = {}
            for mode in ("off", "on"):
                results[preset][mode] = {**run(args, preset, mode, Path(tmp)), **run(args, preset, mode, Path(tmp),
                                                                                     batch="probe")}
                if not args.no_auto:
                    results[preset][mode]["auto"] = run(args, preset, mode, Path(tmp), batch="auto")
    write_results(report(args, results, load_before))


def report(args, results: dict, load_before: float) -> dict:
    import torch

    from penwright.devices import cpu_description

    on_gpu = next(iter(results.values()))["off"]["device"].startswith("cuda")
    return {
        "what": f"penwright's training step, GPT-2 shapes with random weights (vocabulary "
                f"{next(iter(results.values()))['off']['vocab']}), batch {args.batch_size} x block "
                f"{args.block_size}, {args.steps} steps (the first not timed), --gradient-checkpointing off and on; "
                f"--batch-size auto within --memory-limit {args.budget}" + (" (skipped)" if args.no_auto else ""),
        "isa": "cuda" if on_gpu else torch.backends.cpu.get_cpu_capability().lower(),
        "machine": {"platform": platform.platform(), "cpu": cpu_description(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if on_gpu else None,
                    "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "results": results,
        "checkpointing_vs_not": {preset: {"peak": round(r["on"]["peak_mib"] / r["off"]["peak_mib"], 2),
                                          "tokens_per_s": round(r["on"]["tokens_per_s"] / r["off"]["tokens_per_s"], 2)}
                                 for preset, r in results.items()},
    }


def write_results(report: dict) -> None:
    from penwright import files

    name = f"memory-{report['isa']}.json"
    (HERE / "results").mkdir(exist_ok=True)
    files.write_text(HERE / "results" / name, json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    rows = []
    for preset, r in report["results"].items():
        for mode in ("off", "on"):
            auto = r[mode].get("auto")
            rows.append(f"| {preset} | {mode} | {r[mode]['peak_mib']} MiB | {r[mode]['per_sequence_mib']} MiB | "
                        f"{r[mode]['tokens_per_s']} | "
                        + (auto_choice(auto) if auto else "-") + " |")
    ratios = "; ".join(f"{p}: peak {v['peak']}x, tokens/s {v['tokens_per_s']}x"
                       for p, v in report["checkpointing_vs_not"].items())
    section = "\n".join([
        START, f"## Gradient checkpointing and --batch-size auto (`make bench-memory`, {report['isa']})", "",
        f"{report['what']}. {m['gpu'] or m['cpu']}; load average {m['load_average_before']} before, "
        f"{m['load_average_after']} after; {m['date']}. Raw numbers: `benchmarks/results/{name}`.", "",
        "| model | checkpointing | peak memory of the steps | one more sequence | tokens/s | --batch-size auto chose "
        "(micro x accumulation, of 16) |", "| --- | --- | --- | --- | --- | --- |", *rows, "",
        f"Checkpointing on against off: {ratios}. The peak holds the weights, gradients and AdamW's state, which "
        "checkpointing does not shrink; 'one more sequence' is what each sequence of a micro-batch adds (half the "
        "difference of the --batch-size auto trials of 2 and 4 sequences), which it does.", END])
    replace_section(START, END, section)
    print(section)


if __name__ == "__main__":
    main()
