"""`penwright export`: a run as one GGUF file for llama.cpp, Ollama and LM Studio, or a LoRA run as
a plain HF model.

    penwright export --gguf runs/book --out book.gguf [--quantize f32|f16|q8_0] [--ollama] [--no-check]
    penwright export --merge runs/book-lora --out models/book-merged

`--gguf` loads the run as `penwright generate` would (a LoRA run merged into its base), writes the
file under a temporary name and renames it when complete (gguf_file.py), optionally writes an
Ollama Modelfile beside it, then reads the file back and compares it with the run (parity.py).
A file that does not pass is kept, and the command says so and exits 1.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import files
from .config import ExportConfig, SampleConfig
from .errors import PenwrightError

SAMPLE = Path(__file__).parent / "data" / "sample_stories.csv"
HELD_OUT_CHARS = 10_000  # the slice of the validation split the parity check scores
CHATML = '''{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''


class ParityError(PenwrightError):
    """The exported file was written but does not write what the run writes (the CLI exits 1)."""


def export(cfg: ExportConfig, log=print, report=print):
    """Run `penwright export`; `report` receives the parity check's comparison, line by line."""
    if cfg.merge is not None:
        from .lora import export_merged

        return export_merged(cfg.merge, cfg.out, log=log)
    from .runs import locked

    run = source(cfg.gguf)
    if _is_checkpoint(run):  # published checkpoints do not change: one may be exported while training goes on
        return export_gguf(cfg, log=log, report=report)
    with locked(run, "export"):  # no training may change the run while it is read
        return export_gguf(cfg, log=log, report=report)


def export_gguf(cfg: ExportConfig, log=print, report=print) -> Path:
    """Write run `cfg.gguf` to the GGUF file `cfg.out`, then check it (unless `cfg.no_check`)."""
    from . import gguf_file
    from .generate import load
    from .runs import learned_context

    run, out = source(cfg.gguf), target(cfg.out)
    name, home = _name(run), _home(run)
    writer = load(str(run), precision="fp32", device="cpu", log=log, engine="hf")
    writer.context = min(writer.context, learned_context(home) or writer.context)  # a checkpoint's run's
    try:
        with files.replacing(out) as tmp:
            gguf_file.write(writer.model, writer.tokenizer, tmp, cfg.quantize, writer.context, name,
                            SampleConfig())
        files.fsync_dir(out.parent)
    except PenwrightError as e:  # a model or tokenizer the GGUF format cannot describe
        raise PenwrightError(f"--gguf {cfg.gguf}: {e}") from None
    except Exception as e:
        if not files.disk_full(e):
            raise
        raise PenwrightError(f"disk full while writing {out}: free space on that disk and export again; "
                             f"nothing was written to {out}") from None
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {cfg.quantize})")
    if cfg.ollama:
        modelfile = out.parent / "Modelfile"
        files.write_text(modelfile, ollama_modelfile(writer, out, name))
        log(f"wrote {modelfile}: `ollama create {name} -f {modelfile}`")
    if not cfg.no_check:
        from .parity import check

        result = check(writer, out, cfg.quantize, *held_out(run, log))
        for line in result.lines:
            report(line)
        if result.failures:
            raise ParityError(f"{out} did not pass the parity check against {cfg.gguf}: "
                              f"{result.failures[0]}; the file is kept for you to inspect "
                              "(what each check means: docs/export.md)")
    return out


# --- what to export, and where ------------------------------------------------------------------

def source(spec: str) -> Path:
    """The folder to export: a finished run, a complete checkpoint or an HF model folder."""
    from . import checkpoint, lora
    from .runs import check_finished

    path = Path(spec).expanduser()
    if not path.is_dir():
        kind = " (it is a file)" if path.exists() else ""
        raise PenwrightError(f"--gguf {spec}: no such run directory{kind}")
    if _is_checkpoint(path) and not checkpoint.verify(path):
        newest = next((p for p in checkpoint.complete(path.parent.parent) if checkpoint.verify(p)), None)
        hint = f"use the newest complete one, {newest}" if newest else "wait for training to publish one"
        raise PenwrightError(f"--gguf {spec}: a checkpoint still being written (or damaged: its manifest "
                             f"does not check out); {hint}")
    check_finished(path)
    if not (path / "config.json").is_file() and not lora.is_adapter(path):
        raise PenwrightError(f"--gguf {spec}: not a finished run (no config.json); give a run directory, "
                             "a checkpoint or a Hugging Face model folder")
    return path


def target(spec: str) -> Path:
    out = Path(spec).expanduser()
    if not out.parent.is_dir():
        raise PenwrightError(f"--out {spec}: the folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise PenwrightError(f"--out {spec} is a folder; give the file to write, e.g. {out / 'model.gguf'}")
    return out


def _name(run: Path) -> str:
    """The model's name: the run's folder, with the step for a checkpoint."""
    return f"{run.parent.parent.name}-{run.name}" if _is_checkpoint(run) else run.name


def _is_checkpoint(path: Path) -> bool:
    return path.parent.name == "checkpoints"


def _home(path: Path) -> Path:
    """The run directory a folder belongs to: itself, or a checkpoint's run."""
    return path.parent.parent if _is_checkpoint(path) else path


def held_out(run: Path, log) -> tuple[list, str]:
    """A slice of the run's validation split for the parity check, or of penwright's sample text
    for a folder that is not a run (or whose corpus cannot be read any more)."""
    from .config import EvalConfig
    from .evaluation import held_out as eval_held_out
    from .runs import RunDir

    home = _home(run)
    try:
        if RunDir(home).read_config() is None:
            raise PenwrightError(f"{home} is not a penwright run")
        docs, source = eval_held_out(EvalConfig(model=[str(home)]))[:2]
    except PenwrightError as e:
        log(f"note: the parity check scores penwright's sample stories instead of a validation split ({e})")
        docs = eval_held_out(EvalConfig(model=[str(run)], data=str(SAMPLE), train_data=str(SAMPLE),
                                        text_column="synopsis"))[0]
        source = "penwright's sample stories"
    kept, room = [], HELD_OUT_CHARS
    for doc in docs:
        if room <= 0:
            break
        kept.append(replace(doc, text=doc.text[:room]))
        room -= len(kept[-1].text)
    return kept, source


# --- Ollama -------------------------------------------------------------------------------------

def ollama_modelfile(writer, gguf: Path, name: str) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`: the file, its chat format, stops and defaults."""
    from .gguf_file import END_OF_TURN, chatml
    from .tokens import EOS

    tokenizer, sampling = writer.tokenizer, SampleConfig()
    lines = [f"# Ollama Modelfile for {name}, written by penwright export.",
             f"#   ollama create {name} -f Modelfile", f"#   ollama run {name} \"Once upon a time\""]
    if writer.labels:
        label = min(writer.labels)
        token = tokenizer.convert_ids_to_tokens(writer.labels[label])
        lines += ["# Write in a label's style by starting the prompt with its control token:",
                  f"#   ollama run {name} \"{token}Once upon a time\"",
                  f"# Labels: {', '.join(sorted(writer.labels))}"]
    lines += ["", f"FROM ./{gguf.name}"]
    # <|endoftext|> too where it is not the EOS: SmolLM2's EOS is <|im_end|>
    stops = [tokenizer.eos_token] + [EOS] * (EOS in tokenizer.get_vocab())
    if chatml(tokenizer):
        lines.append(f'TEMPLATE """{CHATML}"""')
        stops.append(END_OF_TURN)
    elif isinstance(tokenizer.chat_template, str):
        lines += ["# The chat template travels in the file (tokenizer.chat_template); it is not ChatML,",
                  "# so chatting needs a TEMPLATE in Ollama's syntax. Plain prompts work as they are."]
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    lines += [f"PARAMETER temperature {sampling.temperature}", f"PARAMETER top_k {sampling.top_k}",
              f"PARAMETER top_p {sampling.top_p}", f"PARAMETER num_ctx {writer.context}"]
    return "\n".join(lines) + "\n"
