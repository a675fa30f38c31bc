"""Typed settings for every command, with defaults and validation in one place.

The CLI builds its flags from these dataclasses (``--block-size`` is ``block_size``), so the
library, the CLI and the server accept and refuse exactly the same values.
"""

from __future__ import annotations

import functools
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import PenwrightError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def opt(default, help: str, **extra):
    """A dataclass field carrying its CLI help text (and optional argparse extras)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PenwrightError(message)


def _at_least(config, minimum: int, *names: str) -> None:
    what = f"at least {minimum}" if minimum else "not negative"
    for name in names:
        value = getattr(config, name)
        _check(value >= minimum, f"--{name.replace('_', '-')} must be {what}, got {value}")


def check_types(config) -> None:
    """Refuse a value of the wrong type, as the library API and the server can pass any.

    Run first in each config's checks, so the range checks after it compare numbers with numbers.
    """
    for name, kind in _hints(type(config)).items():
        value = getattr(config, name)
        _check(_fits(value, kind), f"--{name.replace('_', '-')} must be {_describe(kind)}, got {_short(value)}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, kind) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if kind is float:  # an int will do; inf, nan and ints too big for a float will not
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:
            return False
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(args) if len(args) > 1 else args[0]
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    names = {float: "a finite number", int: "a whole number", bool: "true or false", str: "text", type(None): "unset"}
    return names.get(kind, kind.__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Settings:
    """The base of every config: after construction, the types of all fields are checked, then each
    class's own `check` runs (base classes first), so each class validates only the fields it declares."""

    def __post_init__(self):
        check_types(self)
        for cls in reversed(type(self).__mro__):
            if own := cls.__dict__.get("check"):
                own(self)


@dataclass
class Runtime(Settings):
    """Where and how a model runs: shared by train, generate, eval and serve."""

    precision: Precision = opt("auto", "auto (bf16 where the CPU or GPU has it natively), fp32, bf16 "
                                       "or fp16 (CUDA only)")
    device: str = opt("auto", "auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps")
    allow_pickle: bool = opt(False, "allow loading pickled .bin/.pt weights (they can run code)")


@dataclass
class DataConfig(Settings):
    """Where the corpus is and how to read it."""

    data: str | None = opt(None, "corpus: a .txt file, a folder of .txt/.md files, or a .csv/.jsonl file")
    text_column: str = opt("text", "CSV/JSONL column holding the text")
    label_column: str | None = opt(None, "CSV/JSONL column whose values become control tokens like <|genre=horror|>")
    prompt_column: str | None = opt(None, "CSV/JSONL column with prompts (no loss on them)")
    completion_column: str | None = opt(None, "CSV/JSONL column with completions (the loss is on these)")
    line_by_line: bool = opt(False, "make every non-empty line its own document")
    keep_line_breaks: bool = opt(False, "keep the line breaks of hard-wrapped .txt/.md files (by default, a file "
                                        "whose lines show it was wrapped at a fixed width, as Project Gutenberg's "
                                        "books are, gets the lines of each paragraph joined)")
    val_fraction: float = opt(0.1, "share of documents held out for validation")
    val_file: str | None = opt(None, "use this corpus as the validation split instead of holding out")
    encoding: str = opt("utf-8", "text encoding of the corpus files, e.g. latin-1")
    cache_dir: str | None = opt(None, "where prepared token arrays are cached (default ~/.cache/penwright)")
    format: Literal["auto", "text", "messages", "sharegpt", "alpaca"] = opt(
        "auto", "how to read JSONL/JSON/CSV rows: text (--text-column etc.), or conversations: messages "
                "(OpenAI's role/content list), sharegpt (conversations of from/value), alpaca (instruction, "
                "input, output); auto tells them apart by their columns")
    max_bad_rows: int = opt(0, "malformed rows (bad JSON, unknown role, empty content, no assistant turn) "
                               "to skip and count before refusing the corpus")

    def check(self):
        _at_least(self, 0, "max_bad_rows")
        _check(0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        _check((self.prompt_column is None) == (self.completion_column is None),
               "--prompt-column and --completion-column go together: give both or neither")


@dataclass
class PrepareConfig(DataConfig):
    """Corpus plus the tokenizer to encode it with (taken from --model unless given)."""

    model: str = opt("gpt2", "hub id (gpt2, distilgpt2, ...), a local model directory, or a .gguf file")
    init: Literal["pretrained", "scratch"] = opt("pretrained", "start from --model's weights or from scratch")
    preset: Literal["tiny", "small", "medium"] = opt("small", "model size with --init scratch: tiny, small "
                                                              "(GPT-2 124M shape) or medium")
    tokenizer: str | None = opt(None, "tokenizer to use (default: --model's; with --init scratch a new BPE)")
    vocab_size: int = opt(8192, "vocabulary size of a BPE trained with --init scratch and no --tokenizer")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")
    train_on: Literal["assistant", "all"] = opt("assistant", "conversations: learn the assistant's replies "
                                                             "(each with its end-of-turn token) or every token")
    block_size: int | None = opt(None, "tokens per training sequence (default: min(model context, 512))")
    truncate: bool = opt(False, "conversations: cut one longer than the block to its first --block-size "
                                "tokens instead of leaving it out")

    def check(self):
        _check(self.block_size is None or self.block_size >= 8,
               f"--block-size must be at least 8, got {self.block_size}")
        _check(self.vocab_size >= 300, f"--vocab-size must be at least 300 (256 bytes + merges), got {self.vocab_size}")


@dataclass
class PreviewConfig(PrepareConfig):
    """`penwright prepare`: the corpus and tokenizer, and how much of the result to show."""

    show: int = opt(0, "print this many examples as the model will read them, trained tokens highlighted")

    def check(self):
        _at_least(self, 0, "show")


@dataclass
class TrainConfig(Runtime, PrepareConfig):
    """Everything `penwright train` needs."""

    out: str | None = opt(None, "run directory to write (model, checkpoints, metrics, loss.png)")
    overwrite: bool = opt(False, "replace a run directory that holds a different run")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --out")
    batch_size: int | Literal["auto"] = opt(8, "sequences per micro-batch, or auto: the largest whose forward and "
                                               "backward fit in memory (--memory-limit), with --grad-accum set to "
                                               "make --tokens-per-step")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    tokens_per_step: int | None = opt(None, "tokens per optimizer step, all processes together: sets --grad-accum "
                                            "(default with --batch-size auto: 16384, fine-tuning or from scratch)")
    memory_limit: str | None = opt(None, "most memory --batch-size auto may plan for, e.g. 6G or 800M (default: "
                                         "what the GPU, or the machine and its cgroup limit, leave free; "
                                         "or $PENWRIGHT_MEMORY_LIMIT)")
    gradient_checkpointing: Literal["auto", "on", "off"] = opt(
        "auto", "recompute activations in backward instead of keeping them: far less memory for about a third more "
                "compute; auto turns it on when --batch-size auto finds that not even one sequence fits without it")
    lr: float | None = opt(None, "peak learning rate (default 5e-5 fine-tuning, 2e-4 with --lora, 1e-3 from scratch)")
    min_lr_ratio: float = opt(0.1, "cosine decay ends at lr * this")
    warmup_steps: int | None = opt(None, "linear warm-up steps (default: 5%% of steps, at most 100)")
    weight_decay: float = opt(0.01, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 turns it off)")
    max_bad_steps: int = opt(10, "steps with a non-finite loss or gradient to skip before training stops")
    max_steps: int | None = opt(None, "optimizer steps to run (default: --epochs)")
    epochs: float | None = opt(None, "passes over the training split (default 1 when --max-steps is unset)")
    seed: int = opt(42, "random seed for initialisation, data order and dropout")
    eval_every: int = opt(200, "steps between validation evaluations (0: only at start and end)")
    eval_batches: int = opt(50, "batches per periodic evaluation (the final one uses the whole split)")
    early_stop: int | None = opt(None, "stop after this many evaluations (every --eval-every steps) without a better "
                                       "validation loss; implies --keep-best")
    keep_best: bool = opt(False, "keep the weights with the best validation loss apart (checkpoints/best) and "
                                 "publish those, not the last ones")
    eval_at_end: bool = opt(False, "when training ends, run `penwright eval`'s perplexity and continuation test "
                                   "on the validation split and add them to the model card")
    sample_every: int = opt(500, "steps between printed samples (0: never)")
    sample_length: int = opt(64, "tokens per training sample")
    save_every: int = opt(500, "steps between checkpoints (0: only at the end); each holds the weights (4 bytes a "
                               "parameter) and the optimizer state (8 more; see --no-save-optimizer)")
    save_optimizer: bool = opt(True, "keep AdamW's state in checkpoints, so that a resume continues exactly; "
                                     "--no-save-optimizer makes them a third of the size (a 135M-parameter model's: "
                                     "0.5 GB instead of 1.6 GB), and a resume then restarts the optimizer")
    keep_checkpoints: int = opt(2, "checkpoints to keep")
    log_every: int = opt(10, "steps between progress-bar and metrics.jsonl updates")
    log: str | None = opt(None, "also log to a viewer: tensorboard (event files in the run dir, for "
                                "`tensorboard --logdir runs/`; offline, no account); metrics.jsonl is always written")
    compile: bool = opt(False, "compile the model with torch.compile")
    head_loss: Literal["chunked", "full"] = opt("chunked", "loss through the vocabulary-wide output head: chunked "
                                                "(never holds all logits; less memory) or full")
    dropout: float | None = opt(None, "dropout while training, except on attention probabilities "
                                      "(default: the model's own, 0.1 for GPT-2; 0 is faster)")
    attention_dropout: float = opt(0.0, "dropout on attention probabilities while training; 0 as in most recent "
                                        "models (GPT-2's own is 0.1; less memory without it)")
    threads: int | None = opt(None, "CPU threads for PyTorch (default: all cores)")
    malloc: Literal["keep", "system"] = opt("keep", "on CPU, keep freed memory for the next step (no page "
                                                   "faults, faster) or hand it back to the system at once")
    attention: Literal["auto", "sdpa"] = opt("auto", "attention kernel while training: auto (SDPA, except on CPU in "
                                                     "bf16 with attention dropout: three plain ops, several times "
                                                     "faster than SDPA's unfused path there) or sdpa")
    nproc: int = opt(1, "processes to train with on this machine, one per GPU (launches torchrun)")
    fsdp: bool = opt(False, "under torchrun, shard parameters, gradients and optimizer state (FSDP2) "
                            "instead of replicating them (DDP)")
    lora: str | None = opt(None, "train low-rank adapters instead of every weight, e.g. r=16,alpha=32,dropout=0.05"
                                 "[,targets=c_attn,c_proj]")

    def check(self):
        _at_least(self, 1, "grad_accum", "keep_checkpoints", "log_every", "sample_length", "eval_batches")
        _check(self.batch_size == "auto" or self.batch_size >= 1,
               f"--batch-size must be at least 1 or auto, got {self.batch_size}")
        _at_least(self, 0, "eval_every", "sample_every", "save_every", "weight_decay", "grad_clip", "max_bad_steps")
        _check(self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        _check(0 <= self.attention_dropout < 1, f"--attention-dropout must be in [0, 1), got {self.attention_dropout}")
        _check(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}")
        _check(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _check(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be positive, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.nproc >= 1, f"--nproc must be at least 1, got {self.nproc}")
        self._check_budget()
        self._check_stopping()
        if self.lora is not None:
            parse_lora(self.lora)
            _check(self.init == "pretrained", "--lora adapts a pretrained model; drop --init scratch")
            _check(not self.fsdp, "--lora with --fsdp is not supported; LoRA's frozen base fits where DDP does")

    def _check_budget(self):
        if self.tokens_per_step is not None:
            _at_least(self, 1, "tokens_per_step")
            _check(not self.block_size or self.tokens_per_step >= self.block_size,
                   f"--tokens-per-step {self.tokens_per_step} is smaller than one block of {self.block_size} tokens; "
                   f"give at least {self.block_size}, or a smaller --block-size")
        if self.grad_accum != 1:
            _check(self.batch_size != "auto", "--batch-size auto sets --grad-accum itself (to make "
                                              "--tokens-per-step); drop --grad-accum")
            _check(self.tokens_per_step is None, "--tokens-per-step sets --grad-accum; give one of them, not both")
        if self.memory_limit is not None:
            parse_size(self.memory_limit, "--memory-limit")
        _check(self.log in (None, *LOG_BACKENDS), f"--log {self.log!r}: unknown backend; penwright writes "
                                                  f"{', '.join(LOG_BACKENDS)} (metrics.jsonl is always written)")

    def _check_stopping(self):
        _check(self.early_stop is None or self.early_stop >= 1,
               f"--early-stop must be at least 1, got {self.early_stop}")
        for flag, given in (("--early-stop", self.early_stop is not None), ("--keep-best", self.keep_best)):
            _check(not given or self.eval_every > 0, f"{flag} compares periodic evaluations, and --eval-every is 0: "
                                                     "give --eval-every N (steps between evaluations)")

    @property
    def keeps_best(self) -> bool:
        return self.keep_best or self.early_stop is not None

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.init == "scratch":
            return 1e-3
        return 2e-4 if self.lora else 5e-5

    @property
    def lora_spec(self) -> LoraSpec | None:
        return None if self.lora is None else parse_lora(self.lora)


@dataclass
class SampleConfig(Settings):
    """How to sample text; shared by generate, interactive, training samples, eval and the server."""

    max_new_tokens: int = opt(128, "tokens to generate per sample")
    temperature: float = opt(0.8, "sampling temperature (> 0); lower is more predictable")
    top_k: int = opt(40, "sample only from the k likeliest tokens (0: no limit)")
    top_p: float = opt(1.0, "sample only from the smallest set of tokens whose probability reaches p, in (0, 1]")
    repetition_penalty: float = opt(1.0, "divide the odds of tokens already present by this (1: off)")
    greedy: bool = opt(False, "always take the likeliest token (ignores temperature, top-k, top-p)")
    num_samples: int = opt(1, "samples per prompt")
    batch_size: int = opt(8, "samples generated at once")
    seed: int | None = opt(None, "random seed: the same seed gives the same text")
    stop: list[str] = opt([], "stop a sample at this string (repeatable)", action="append")
    trim_to_sentence: bool = opt(False, "cut each sample after its last complete sentence")
    label: str | None = opt(None, "write in this label's style, e.g. --label horror "
                                  "(models trained with --label-column)")

    def check(self):
        _check(self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        _check(self.greedy or (math.isfinite(self.temperature) and self.temperature > 0),
               f"--temperature must be > 0 when sampling, got {self.temperature} (use --greedy for deterministic text)")
        _check(self.top_k >= 0, f"--top-k must be 0 (off) or positive, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"--repetition-penalty must be positive, got {self.repetition_penalty}")
        _check(self.num_samples >= 1, f"--num-samples must be at least 1, got {self.num_samples}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(self.seed is None or 0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}")
        _check(all(isinstance(s, str) and s for s in self.stop), "--stop strings must not be empty")

    def sampling(self) -> SampleConfig:
        """Just the sampling settings of a config that extends this one."""
        names = SampleConfig.__dataclass_fields__
        return SampleConfig(**{k: v for k, v in asdict(self).items() if k in names})


@dataclass
class WritingRuntime(Runtime):
    """What writes: the engine and its weights; shared by generate and serve."""

    quantize: Literal["int8", "none"] = opt("int8", "on CPU, store weights as int8 for faster writing (perplexity "
                                                    "within 1%% of fp32's: +0.8%% on SmolLM2-135M), or none")
    engine: Literal["auto", "penwright", "hf"] = opt(
        "auto", "what runs the model: penwright (its own engine, fast to start and to write; local GPT-2, "
                "Llama, Mistral and Qwen2 folders with safetensors and tokenizer.json), hf (transformers: "
                "any causal LM, hub ids, .gguf, LoRA runs), or auto (penwright where it can, else hf)")


@dataclass
class GenerateConfig(WritingRuntime, SampleConfig):
    """`penwright generate` and `penwright interactive`: a model plus sampling settings."""

    model: str | None = opt(None, "run directory (or any HF model directory, hub id or .gguf) to sample from")
    prompt: str | None = opt(None, "text to continue (default: unconditional samples)")
    prompt_file: str | None = opt(None, "file with one prompt per line")
    output: str | None = opt(None, "also write the samples to this .jsonl file (one JSON object per sample: "
                                   "prompt, text, label, finish_reason, new_tokens, seed)")

    def check(self):
        _check(not (self.prompt is not None and self.prompt_file is not None),
               "give --prompt or --prompt-file, not both")
        if self.output is not None:  # checked before any writing, which may take minutes
            folder = os.path.dirname(os.path.expanduser(self.output)) or "."
            _check(self.output.lower().endswith(".jsonl"), f"--output {self.output}: samples are written as JSON "
                   "lines (prompt, text, label, ...); name the file .jsonl, e.g. --output samples.jsonl")
            _check(os.path.isdir(folder), f"--output {self.output}: there is no folder {folder}; create it first")


@dataclass
class ChatConfig(GenerateConfig):
    """`penwright chat`: a model with a chat template, a system prompt and sampling settings."""

    system: str | None = opt(None, "system prompt that starts the conversation")


@dataclass
class EvalConfig(Runtime, SampleConfig, DataConfig):
    """`penwright eval`: models to compare, the held-out text, and how to sample continuations.

    `--data` is held out whole; without it, the validation split of the first run dir among
    the models is used (and its training split for the memorisation check).
    """

    model: list[str] = opt([], "run directory, model directory, hub id or .gguf to evaluate, as PATH or "
                               "NAME=PATH to name it in the report (repeat to compare)", action="append")
    train_data: str | None = opt(None, "training corpus to look for copied text in (default: the first run dir's)")
    out: str | None = opt(None, "folder for report.json, report.md and the charts (default: only print the table)")
    stride: int | None = opt(None, "tokens the perplexity window moves each step (default: half the context)")
    holdout_words: int = opt(20, "words held back at the end of each document for the continuation test")
    max_passages: int = opt(100, "held-out passages for the continuation test: documents, and pieces of long ones "
                                 "(perplexity uses all the text)")
    label_samples: int = opt(10, "samples per label for the label-control test")
    num_samples: int = opt(3, "continuations per held-out document (self-BLEU compares them)")
    seed: int | None = opt(1, "random seed for the samples: the same seed gives the same report")
    precision: Precision = opt("fp32", "fp32 (exact metrics), bf16 or fp16 (CUDA only), or auto")

    def check(self):
        _check(bool(self.model), "no model given: pass --model runs/NAME (repeat --model to compare several)")
        _check(len(set(self.model)) == len(self.model), "the same --model is given twice")
        _check(self.label is None, "eval conditions each document on its own label; drop --label")
        _check(self.stride is None or self.stride >= 1, f"--stride must be at least 1, got {self.stride}")
        _at_least(self, 1, "holdout_words", "max_passages", "label_samples")
        self.models()  # refuses clashing names now rather than after the first model's scores

    def models(self) -> dict[str, str]:
        """Name in the report -> model. A name is NAME from NAME=PATH, else the --model as given."""
        return named_models(self.model, lambda spec: spec)


LOG_BACKENDS = ("tensorboard",)
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str) -> int:
    """Bytes in '6G', '800M', '1.5GiB' or '123456' (K, M, G, T are powers of 1024)."""
    match = SIZE.match(text)
    _check(bool(match) and float(match[1]) > 0, f"{what} {text!r}: expected a size such as 6G, 800M or 1.5GiB")
    return int(float(match[1]) * 1024 ** " kmgt".index((match[2] or " ").lower()))


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ServeConfig(WritingRuntime):
    """`penwright serve`: models behind an OpenAI-compatible API and a web page."""

    model: list[str] = opt([], "run directory to serve, as PATH or NAME=PATH (repeatable)", action="append")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to your network)")
    port: int = opt(8000, "TCP port to listen on")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (default: $PENWRIGHT_API_KEY if set)")
    max_prompt_tokens: int = opt(1024, "refuse prompts longer than this many tokens (with --max-tokens-cap, it sets "
                                       "the KV cache kept per row)")
    max_tokens_cap: int = opt(512, "refuse requests for more new tokens than this")
    max_body_bytes: int = opt(1_000_000, "refuse request bodies larger than this")
    timeout: float = opt(120.0, "seconds a request may wait and run before it is abandoned")
    max_batch: int = opt(8, "most rows written at once (continuous batching; transformers' engine: alike plain "
                            "requests in a batch, streams in turns)")
    max_queue: int = opt(64, "requests that may wait for a row; more are refused with 429 and Retry-After")
    prefill_chunk: int = opt(64, "prompt tokens prefilled per decode step, so a long prompt does not stall streams")
    threads: int | None = opt(None, "CPU threads for PyTorch (default: all cores but one, which answers HTTP)")

    def check(self):
        if self.api_key is None:
            self.api_key = os.environ.get("PENWRIGHT_API_KEY") or None
        _check(self.api_key != "", "--api-key must not be empty")
        _check(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        _at_least(self, 1, "max_prompt_tokens", "max_tokens_cap", "max_body_bytes", "max_batch",
                  "max_queue", "prefill_chunk")
        _check(math.isfinite(self.timeout) and self.timeout > 0, f"--timeout must be positive, got {self.timeout}")
        _check(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        self.models()  # refuses clashing names now rather than at start-up

    def models(self) -> dict[str, str]:
        """Model name -> path. A name is NAME from NAME=PATH, else the folder's own name."""
        return named_models(self.model, lambda spec: os.path.basename(os.path.normpath(spec)))


def named_models(specs: list[str], default_name) -> dict[str, str]:
    """NAME=PATH or PATH flags as name -> path (`default_name(PATH)` names a bare PATH); refuses clashes."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and MODEL_NAME.match(name)):
            name, path = default_name(spec), spec
        _check(bool(path), f"--model {spec!r}: give a path after the '='")
        _check(name not in out, f"two --model flags are both named {name!r}: name them with --model NAME=PATH")
        out[name] = path
    return out


@dataclass
class RunsConfig(Settings):
    """`penwright runs`: the run dirs under a folder, how far each got, and how to continue it."""

    dir: str = opt("runs", "folder holding run dirs, or one run dir", positional=True)
    json: bool = opt(False, "print JSON (a list, one object per run) instead of a table")


@dataclass
class ExportConfig(Settings):
    """`penwright export`: a run as a GGUF file (--gguf), or a LoRA run as a plain HF model (--merge)."""

    gguf: str | None = opt(None, "run directory (or checkpoint, or HF model folder) to write as one GGUF file "
                                 "for llama.cpp, Ollama and LM Studio")
    merge: str | None = opt(None, "LoRA run directory whose adapter to fold into its base model")
    out: str | None = opt(None, "the .gguf file to write (--gguf), or a new folder for the merged model (--merge)")
    quantize: Literal["f32", "f16", "q8_0"] = opt("f16", "GGUF weight type: f32 (exact), f16, or q8_0 (blocks "
                                                         "of 32 int8 values and a scale, about half of f16)")
    ollama: bool = opt(False, "also write an Ollama Modelfile beside the GGUF file")
    no_check: bool = opt(False, "skip the parity check that reads the GGUF file back and compares it with the run")

    def check(self):
        _check(self.gguf is not None or self.merge is not None,
               "nothing to export: pass --gguf runs/NAME (to write a GGUF file) or --merge runs/NAME (a LoRA run)")
        _check(self.gguf is None or self.merge is None, "give --gguf or --merge, not both")
        _check(self.out is not None, "no output given: pass --out FILE.gguf (with --gguf) or --out DIR (with --merge)")
        if self.gguf is not None:
            _check(self.out.lower().endswith(".gguf"), f"--out {self.out}: name the GGUF file, e.g. model.gguf")
        else:
            _check(not (self.ollama or self.no_check or self.quantize != "f16"),
                   "--quantize, --ollama and --no-check go with --gguf, not --merge")


# --- LoRA -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    """What `--lora r=16,alpha=32,dropout=0.05[,targets=c_attn,c_proj]` asks for (lora.py attaches it)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # empty: peft's default for the architecture


def parse_lora(text: str) -> LoraSpec:
    """'r=16,alpha=32,dropout=0.05,targets=c_attn,c_proj': every key optional, targets a list."""
    values, key = {}, None
    for item in (s.strip() for s in text.split(",")):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep and key == "targets" and item:  # the next name in targets=a,b
            values["targets"] += (item,)
            continue
        if name not in LoraSpec.__dataclass_fields__ or not value:
            raise PenwrightError(f"--lora {text!r}: expected r=N,alpha=X,dropout=P[,targets=NAME,...], "
                                 f"not {item!r}")
        key = name
        try:
            values[key] = (value,) if key == "targets" else type(getattr(LoraSpec, key))(value)
        except ValueError:
            raise PenwrightError(f"--lora {text!r}: {key} must be a number, got {value!r}") from None
    spec = LoraSpec(**values)
    if spec.r < 1 or not spec.alpha > 0 or not 0 <= spec.dropout < 1:
        raise PenwrightError(f"--lora {text!r}: need r >= 1, alpha > 0 and 0 <= dropout < 1")
    return spec
