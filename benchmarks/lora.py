"""LoRA against full fine-tuning: peak memory, speed and what is saved, same model, data and settings.

    python benchmarks/lora.py                        # GPT-2 124M shape, 6 steps each, on this machine
    python benchmarks/lora.py --preset tiny --steps 20

The base model has GPT-2's shape and vocabulary (the tokenizer from ../shared/data/gpt2-tokenizer
when present, else a BPE trained on the data) with random weights: speed and memory do not depend
on the weights, and nothing is downloaded. Each mode trains in its own process; its peak resident
memory is that process's maximum RSS. Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB: the peak of the only child
sys.exit(code)
"""


def make_base(folder: Path, preset: str, data: Path, tokenizer_dir: Path) -> Path:
    """A GPT-2-shaped model with random weights, saved as a local 'pretrained' model directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from penwright.models import PRESETS
    from penwright.tokens import load_tokenizer, train_tokenizer

    if tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(str(tokenizer_dir))
    else:
        tokenizer = train_tokenizer([data.read_text()], 8192)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **PRESETS[preset])
    path = folder / "base"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(mode: str, base: Path, data: Path, folder: Path, args) -> dict:
    out = folder / mode
    argv = [sys.executable, "-m", "penwright", "train", "--data", str(data), "--model", str(base), "--out", str(out),
            "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
            "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--sample-every", "0",
            "--sample-length", "8", "--save-every", "0", "--val-fraction", "0.01", "--precision", "fp32",
            "--cache-dir", str(folder / "cache")]
    if data.suffix == ".csv":  # the built-in sample
        argv += ["--text-column", "synopsis"]
    if mode == "lora":
        argv += ["--lora", args.lora]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first step warms up
    saved = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    return {"peak_rss_mib": round(int(done.stdout.split()[-1]) / 1024),
            "tokens_per_s": round(statistics.median(speeds)),
            "wall_s": round(time.perf_counter() - started, 1), "trainable_params": _trainable(out, mode),
            "saved_weights_mib": round(sum(p.stat().st_size for p in saved) / 2**20, 1),
            "final_loss": records[-1].get("val_loss")}


def _trainable(run: Path, mode: str) -> int:
    """Parameters in the saved weights: the adapter for LoRA, the whole model otherwise."""
    from safetensors import safe_open

    with safe_open(run / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="model shape: tiny, small (GPT-2 124M) or medium")
    parser.add_argument("--data", default=str(SHARED / "tinyshakespeare.txt"), help="training text")
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"), help="GPT-2 vocab.json + merges.txt")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lora", default="r=16,alpha=32,dropout=0.05")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_file():
        data = HERE.parent / "src" / "penwright" / "data" / "sample_stories.csv"
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = make_base(folder, args.preset, data, Path(args.tokenizer))
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        results = {mode: run(mode, base, data, folder, args) for mode in ("full", "lora")}
    full, lora = results["full"], results["lora"]
    report = {
        "what": f"penwright train, GPT-2 {args.preset} shape, vocabulary {vocab}, fp32, batch {args.batch_size} "
                f"x block {args.block_size}, {args.steps} steps; full fine-tuning vs --lora {args.lora}",
        "machine": {"platform": platform.platform(), "cpu": __import__("penwright.devices").devices.cpu_description(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": __import__("torch").__version__, "peft": __import__("peft").__version__},
        "device": "cpu",
        **results,
        "lora_vs_full": {"peak_rss": round(lora["peak_rss_mib"] / full["peak_rss_mib"], 2),
                         "tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 2),
                         "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 4),
                         "saved_weights": round(lora["saved_weights_mib"] / full["saved_weights_mib"], 4)},
    }
    target = HERE / "results" / "lora.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
