"""The same fine-tune on a hard-wrapped text, with penwright's reflow (the default) and with
--keep-line-breaks: how often the model's own lines are short (under 20 characters).

The text is the sample synopses wrapped at 70 columns with textwrap, as Project Gutenberg wraps its
books. Usage: python benchmarks/reflow.py [--model PATH --init pretrained] [--steps N] [--out DIR]
Prints one JSON line per setting: the share of generated lines under 20 characters, the mean line
length, and the validation perplexity.
"""

from __future__ import annotations

import argparse
import csv
import json
import textwrap
from pathlib import Path

from penwright import TrainConfig, load, train

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "penwright" / "data" / "sample_stories.csv"
SHORT = 20  # characters: a line this short in prose is the wrapper's habit, not the author's


def wrapped_text(width: int = 70) -> str:
    with open(SAMPLE, newline="") as f:
        return "\n\n".join(textwrap.fill(row["synopsis"], width) for row in csv.DictReader(f)) + "\n"


def line_shape(texts: list[str]) -> dict:
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    return {"lines": len(lines), "share_under_20": sum(len(line) < SHORT for line in lines) / max(1, len(lines)),
            "mean_line_chars": sum(map(len, lines)) / max(1, len(lines))}


def run(data: Path, out: Path, keep: bool, args) -> dict:
    cfg = TrainConfig(data=str(data), out=str(out), model=args.model, init=args.init, preset="tiny",
                      vocab_size=1024, block_size=128, batch_size=16, max_steps=args.steps, lr=args.lr,
                      eval_every=0, sample_every=0, save_every=0, precision="fp32", seed=1, keep_line_breaks=keep,
                      overwrite=True)
    train(cfg, log=lambda *_: None)
    writer = load(str(out), precision="fp32", log=lambda *_: None)
    texts = writer.generate(None, num_samples=args.samples, max_new_tokens=120, seed=7)
    info = json.loads((out / "penwright.json").read_text())
    return {"keep_line_breaks": keep, **line_shape(texts), "val_ppl": info["results"]["val_ppl"],
            "example": texts[0][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--init", default="scratch", choices=["scratch", "pretrained"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/reflow"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "wrapped.txt"
    data.write_text(wrapped_text())
    print(json.dumps({"training text": line_shape([data.read_text()])}))
    for keep in (False, True):
        print(json.dumps(run(data, args.out / ("kept" if keep else "reflowed"), keep, args)), flush=True)


if __name__ == "__main__":
    main()
