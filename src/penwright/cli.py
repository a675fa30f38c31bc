"""`penwright` on the command line: a thin layer that turns flags into configs and calls the library.

Flags are generated from the config dataclasses, so `--block-size 256` is `TrainConfig(block_size=256)`.
Heavy imports (torch, transformers) happen inside the commands, keeping `--help` instant.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import signal
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .config import (
    ChatConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PreviewConfig,
    RunsConfig,
    ServeConfig,
    TrainConfig,
)
from .errors import PenwrightError
from .words import plural


def add_config_flags(parser: argparse.ArgumentParser, config, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field, typed and documented from the field itself."""
    hints = typing.get_type_hints(config)
    for f in fields(config):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in (None, False, []):
            help_text += f" (default: {default})"
        if kind is bool:  # --flag; one that is on by default also gets --no-flag
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
            continue
        if f.metadata.get("action") == "append":
            parser.add_argument(flag, action="append", metavar="TEXT", default=argparse.SUPPRESS, help=help_text)
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", metavar=f.name.upper(), default=argparse.SUPPRESS, help=help_text)
            continue
        options = [a for a in typing.get_args(kind) if a is not type(None)] if _is_union(kind) else [kind]
        base = options[0]
        if typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=argparse.SUPPRESS, help=help_text)
        elif len(options) > 1:  # a number or a word (--batch-size 8 or auto): the config checks which
            parser.add_argument(flag, type=_number_or_word(base), metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type=base, metavar=f.name.upper(), default=argparse.SUPPRESS, help=help_text)


def _number_or_word(kind) -> Callable[[str], object]:
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            return text  # the config names what it accepts if this is not it

    return convert


def _is_union(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penwright", description="Fine-tune GPT-2-family models on your own text and write in its style.",
        epilog="Run `penwright COMMAND --help` for each command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.summary, description=command.summary,
                                  epilog="examples:\n" + command.examples,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_flags(sub, command.config, command.skip)
        sub.set_defaults(command=command)
        parser.commands[command.name] = sub  # for each command's own usage in `parse`
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags, or argparse's exit 2 with the command's own usage and, for a misspelled flag,
    the one it is closest to ("did you mean --temperature?")."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command.name]
        known = list(command._option_string_actions)
        close = [match for arg in unknown if arg.startswith("-")
                 for match in difflib.get_close_matches(arg.split("=")[0], known, n=1)]
        hint = f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stderr.isatty():  # into a log file: libraries' own bars (transformers' GGUF loading) may
        os.environ.setdefault("TQDM_MININTERVAL", "30")  # say where they are every 30 s, not 10 times a second
    args = parse(argv)
    command = args.command
    settings = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        return command.run(command.config(**settings)) or 0
    except PenwrightError as e:
        print(f"penwright: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not str(e):  # training's own stop (training.Stopped) has said what it saved
            print("\npenwright: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`penwright generate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + 13  # what a shell reports for a tool that SIGPIPE ended


def warn(message: str) -> None:
    print(message, file=sys.stderr)


# --- commands ---------------------------------------------------------------------------------

def cmd_prepare(cfg: PreviewConfig) -> None:
    from .tokens import prepare

    store = prepare(cfg, log=warn)
    if cfg.show:
        return _show(store, cfg)
    for key, value in store.stats.items():
        if key == "labels":
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        print(f"{key.replace('_', ' '):>16}: {value:,}" if isinstance(value, int) else f"{key:>16}: {value}")
    print(f"{'cache':>16}: {store.path}")


def _show(store, cfg: PreviewConfig) -> None:
    """`prepare --show N`: N examples with their learned tokens highlighted, then the totals."""
    from rich.console import Console
    from rich.panel import Panel

    from .models import default_block_size
    from .preview import CONTEXT, LEARNED, examples, totals

    console = Console()
    console.print(f"[{LEARNED}]learned[/] [{CONTEXT}]read, not learned[/]")
    for i, text in enumerate(examples(store, cfg.show), 1):
        console.print(Panel(text, title=f"example {i}", title_align="left"))
    block = cfg.block_size or (default_block_size(cfg.model, cfg.init, cfg.preset, cfg.trust_remote_code)
                               if store.conversations else None)
    for name, value in [*totals(store, cfg, block), ("cache", str(store.path))]:
        print(f"{name:>16}: {value}")


def cmd_train(cfg: TrainConfig) -> int | None:
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: become it
        from .distributed import launch

        return launch(cfg.nproc, ["train", *as_flags(cfg, skip=("nproc",))])
    from .training import train

    train(cfg, log=warn)


def as_flags(config, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that rebuild `config` (the inverse of add_config_flags)."""
    argv = []
    for f in fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in skip or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [x for item in (value if isinstance(value, list) else [value]) for x in (flag, str(item))]
    return argv


def _writer(cfg: GenerateConfig):
    from .generate import load

    if not cfg.model:
        raise PenwrightError("no model given: pass --model runs/NAME (or a model directory, hub id or .gguf)")
    return load(cfg.model, cfg.precision, cfg.device, cfg.allow_pickle, log=warn, quantize=cfg.quantize,
                engine=cfg.engine)


def cmd_generate(cfg: GenerateConfig) -> None:
    prompts: list[str | None] = [cfg.prompt]
    if cfg.prompt_file:
        try:
            prompts = [line for line in Path(cfg.prompt_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise PenwrightError(f"--prompt-file {cfg.prompt_file}: cannot read ({e})") from None
        if not prompts:
            raise PenwrightError(f"--prompt-file {cfg.prompt_file} holds no prompts (one per line)")
    writer = _writer(cfg)
    sampling = cfg.sampling()
    if len(prompts) == 1 and cfg.num_samples == 1:
        samples = [_stream(writer, prompts[0], sampling)]
    else:
        samples = writer.samples(prompts, sampling)
        for i, sample in enumerate(samples, 1):
            print(f"===== sample {i} =====")
            print((sample.prompt or "") + sample.text)
    if cfg.output:
        from . import files

        lines = [json.dumps({**asdict(s), "seed": cfg.seed}) for s in samples]
        files.write_text(Path(cfg.output), "\n".join(lines) + "\n")
        warn(f"wrote {plural(len(samples), 'sample')} to {cfg.output}")


def _stream(writer, prompt: str | None, sampling, stop=None):
    """Print the prompt in bold (on a terminal), then the continuation as it is written; return the Sample,
    or None when `stop` (a guards.StopFlag) was raised by Ctrl+C, which ends the writing after the current piece."""
    bold = sys.stdout.isatty()
    if prompt:
        sys.stdout.write(f"\033[1m{prompt}\033[0m" if bold else prompt)
    pieces = writer.stream(prompt, sampling)
    while not (stop and stop.raised):
        try:
            piece = next(pieces)
        except StopIteration as done:  # the generator's return value: the finished Sample
            sys.stdout.write("\n")
            return done.value
        sys.stdout.write(piece)
        sys.stdout.flush()
    pieces.close()
    return None


def _typed(prompt: str, hint: str, ctrl_c: str | None = None):
    """Non-empty lines typed at `prompt` (with line editing where readline exists) until Ctrl+D. `hint`
    goes to stderr first; with `ctrl_c`, Ctrl+C at the prompt says that instead of quitting."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(hint, file=sys.stderr)
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            if ctrl_c is None:
                raise
            print(f"\n{ctrl_c}", file=sys.stderr)
            continue
        if line.strip():
            yield line


def cmd_interactive(cfg: GenerateConfig) -> None:
    from .guards import StopFlag

    writer = _writer(cfg)
    sampling = cfg.sampling()
    hint = "Type a prompt and press Enter. Ctrl+C stops the writing; at the prompt, Ctrl+C or Ctrl+D quits."
    for prompt in _typed("prompt> ", hint):
        with StopFlag(signal.SIGINT) as ctrl_c:  # stops this prompt's samples, not the session
            for i in range(cfg.num_samples):
                if cfg.num_samples > 1:
                    print(f"===== sample {i + 1} =====")
                if _stream(writer, prompt, sampling, ctrl_c) is None:
                    print(flush=True)
                    print("[stopped]", file=sys.stderr)
                    break


def cmd_chat(cfg: ChatConfig) -> None:
    """A conversation in the terminal: each reply streams as it is written; Ctrl+C stops it, Ctrl+D quits."""
    writer = _writer(cfg)
    if not writer.template:
        raise PenwrightError(f"{cfg.model} has no chat template: train it on conversations (messages, ShareGPT "
                             "or Alpaca data), or write with `penwright interactive`")
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    sampling = cfg.sampling()
    hint = "Type a message and press Enter; Ctrl+C stops a reply, Ctrl+D quits."
    for text in _typed("you> ", hint, ctrl_c="(Ctrl+D quits)"):
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": _reply(writer, messages, sampling)})


def _reply(writer, messages: list[dict], sampling) -> str:
    """Stream the assistant's reply to `messages`, dropping the oldest turns if the conversation outgrows
    the context; Ctrl+C ends the reply where it is."""
    prompt = writer.render(messages)
    room = writer.context - min(sampling.max_new_tokens, writer.context // 2)
    while len(writer.tokenizer.encode(prompt)) > room and _drop_oldest(messages):
        prompt = writer.render(messages)
    from .guards import StopFlag

    pieces = []
    stream = writer.stream(prompt, sampling)
    with StopFlag(signal.SIGINT) as ctrl_c:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
            if ctrl_c.raised:
                stream.close()
                sys.stdout.write(" [stopped]")
                break
    sys.stdout.write("\n")
    return "".join(pieces)


def _drop_oldest(messages: list[dict]) -> bool:
    """Forget the oldest exchange (a user turn and its reply), keeping the system prompt and the last turn."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if len(messages) - first <= 1:
        return False
    del messages[first:first + 2]
    warn("(the conversation outgrew the context: its oldest exchange is forgotten)")
    return True


def cmd_eval(cfg: EvalConfig) -> None:
    from rich.console import Console

    from .evaluation import evaluate, table

    Console().print(table(evaluate(cfg, log=warn)))


def cmd_serve(cfg: ServeConfig) -> None:
    from .serve import serve

    serve(cfg, log=warn)


def cmd_export(cfg: ExportConfig) -> int | None:
    from .export import ParityError, export

    try:
        export(cfg, log=warn, report=print)
    except ParityError as e:  # the file is written and kept, but does not write what the run writes
        print(f"penwright: error: {e}", file=sys.stderr)
        return 1


def cmd_runs(cfg: RunsConfig) -> None:
    from .runs import find_runs, summary

    found = [s for s in map(summary, find_runs(Path(cfg.dir))) if s]
    for run in found:
        run["continue"] = _continue_command(run)
        del run["config"], run["cwd"]
    if cfg.json:
        print(json.dumps(found, indent=2))
    elif not found:
        warn(f"no run directories under {cfg.dir}")
    else:
        _print_runs(found)


def _continue_command(run: dict) -> str | None:
    """The `penwright train ... --resume` that continues a stopped or crashed run, from where it was started."""
    if not run["resumable"]:
        return None
    known = {k: v for k, v in run["config"].items() if k in TrainConfig.__dataclass_fields__}
    try:
        cfg = TrainConfig(**known)
    except PenwrightError:  # settings a newer or older penwright wrote
        return None
    command = shlex.join(["penwright", "train", *as_flags(cfg, skip=("overwrite", "resume")), "--resume"])
    here = run["cwd"] in (None, os.getcwd())
    return command if here else f"cd {shlex.quote(run['cwd'])} && {command}"


def _print_runs(found: list[dict]) -> None:
    """A table, then the commands to continue stopped and crashed runs, whole, to copy."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for name in ("run", "model", "data", "steps", "best val ppl", "state"):
        table.add_column(name, overflow="fold")
    for r in found:
        state = r["state"] if r["state"] in ("running", "finished") else \
            f"{r['state']}, " + (f"resumable from {r['checkpoint']}" if r["resumable"] else "no checkpoint")
        steps = f"{r['steps_done']}/{r['steps_planned']}" if r["steps_planned"] else str(r["steps_done"])
        ppl = f"{r['best_val_ppl']:.2f}" if r["best_val_ppl"] is not None else "-"
        table.add_row(r["run"], r["model"], str(r["data"]), steps, ppl, state)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: long lines rather than folds
    for r in found:
        if r["continue"]:
            print(f"\ncontinue {r['run']}:\n  {r['continue']}")


@dataclass(frozen=True)
class Command:
    """One `penwright NAME`: the config its flags come from, and the function that runs it."""

    name: str
    config: type
    summary: str
    run: Callable
    examples: str
    skip: tuple[str, ...] = ()  # config fields that are not flags of this command


COMMANDS = [
    Command("prepare", PreviewConfig, "tokenize a corpus into the cache and print its statistics", cmd_prepare,
            """\
  penwright prepare --data book.txt --model gpt2
  penwright prepare --data plots.csv --text-column plot --label-column genre --model gpt2
  penwright prepare --data chats.jsonl --model SmolLM2.gguf --show 3     # conversations: what is learned"""),
    Command("train", TrainConfig, "fine-tune a model (or train one from scratch) on a corpus", cmd_train, """\
  penwright train --data book.txt --model gpt2 --out runs/book --max-steps 2000
  penwright train --data plots.csv --text-column plot --label-column genre --model distilgpt2 --out runs/plots
  penwright train --data lyrics/ --init scratch --preset tiny --out runs/lyrics --epochs 5
  penwright train --data book.txt --model gpt2 --out runs/book --max-steps 4000 --resume
  penwright train --data book.txt --model gpt2-xl --out runs/book-xl --nproc 4 --batch-size 4     # 4 GPUs, DDP
  penwright train --data book.txt --model gpt2-xl --out runs/book-lora --lora r=16,alpha=32,dropout=0.05
  penwright train --data chats.jsonl --model SmolLM2.gguf --out runs/assistant     # the replies learned
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m penwright train --data book.txt --model gpt2-xl --out runs/book-xl --fsdp     # see docs/distributed.md"""),
    Command("generate", GenerateConfig, "write samples with a trained model", cmd_generate, """\
  penwright generate --model runs/book --prompt "Malfoy hadn't noticed anything." --seed 1
  penwright generate --model runs/plots --label horror --num-samples 3 --trim-to-sentence
  penwright generate --model runs/book --prompt-file prompts.txt --output samples.jsonl"""),
    Command("interactive", GenerateConfig, "a prompt loop: type a prompt, read the continuation", cmd_interactive, """\
  penwright interactive --model runs/book --temperature 0.7 --top-p 0.9""", ("prompt", "prompt_file", "output")),
    Command("chat", ChatConfig, "chat with a model that has a chat template, the replies streaming", cmd_chat,
            """\
  penwright chat --model runs/assistant
  penwright chat --model runs/assistant --system "You answer in one sentence." --temperature 0.7""",
            ("prompt", "prompt_file", "output", "num_samples", "batch_size", "trim_to_sentence", "label")),
    Command("eval", EvalConfig, "score and compare models on held-out text: perplexity, continuations, copying",
            cmd_eval, """\
  penwright eval --model runs/book --model gpt2 --out reports/book          # held out: runs/book's validation split
  penwright eval --model runs/lyrics --model gpt2 --data held_out_songs/ --train-data songs/ --out reports/lyrics
  penwright eval --model runs/plots --data test.csv --text-column plot --label-column genre --num-samples 5""",
            ("label", "val_fraction", "val_file", "cache_dir")),
    Command("serve", ServeConfig, "serve models over an OpenAI-compatible HTTP API and a web page", cmd_serve, """\
  penwright serve --model runs/book                      # page at http://127.0.0.1:8000/, API at /v1
  penwright serve --model runs/book --model lyrics=runs/lyrics --port 8080
  penwright serve --model runs/book --max-batch 16 --max-queue 32   # 16 rows written at once, 32 more may wait
  PENWRIGHT_API_KEY=secret penwright serve --model runs/book --host 0.0.0.0"""),
    Command("runs", RunsConfig, "list run directories: model, data, progress, best perplexity, state, "
                                "and how to continue each", cmd_runs, """\
  penwright runs                       # the runs under runs/
  penwright runs experiments/ --json   # for scripts"""),
    Command("export", ExportConfig, "write a run as a GGUF file for llama.cpp, Ollama and LM Studio (checked "
            "against the run), or a LoRA run merged into its base as a plain HF model", cmd_export, """\
  penwright export --gguf runs/book --out book.gguf                    # f16, then the parity check
  penwright export --gguf runs/plots --out plots.gguf --quantize q8_0 --ollama   # and an Ollama Modelfile
  penwright export --merge runs/book-lora --out models/book-merged     # a LoRA run as a plain HF model"""),
]

if __name__ == "__main__":
    sys.exit(main())
