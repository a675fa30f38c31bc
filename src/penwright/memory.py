"""Fitting training into memory: the budget, the largest micro-batch whose forward and backward fit
it, the gradient accumulation that makes `--tokens-per-step`, and gradient checkpointing.

On a GPU a trial step that does not fit raises an out-of-memory error, which is caught: the
search tries steps until one fails. On a CPU running out of memory gets the process killed, so
the peak resident memory of trial steps of 1 and 2 sequences is measured, extended along a
line to the budget, and the size it gives is checked with one more trial before training.
Trial steps change no weights; the optimizer's state, not yet allocated, is added by count.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import distributed
from .config import TrainConfig, parse_size
from .devices import autocast, release_freed_memory
from .errors import PenwrightError
from .losses import lm_loss

TOKENS_PER_STEP = 16_384  # nanoGPT's from-scratch Shakespeare (64 x 256) and a common fine-tuning batch (32 x 512)
MEMORY_LIMIT = "PENWRIGHT_MEMORY_LIMIT"
HEADROOM = 0.85  # plan for this share of the budget: allocator slack, evaluation and sampling live in the rest


@dataclass(frozen=True)
class Plan:
    """How one optimizer step is cut into micro-batches; recorded in penwright.json, kept on resume."""

    batch_size: int
    grad_accum: int
    checkpointing: bool
    why: str = ""  # the line printed when --batch-size auto or --tokens-per-step chose it
    measured: dict = field(default_factory=dict)  # auto: bytes planned for, the optimizer's, each trial's peak

    def record(self) -> dict:
        return asdict(self)


def plan(cfg: TrainConfig, model, ranks: distributed.Ranks, device: torch.device, dtype: torch.dtype,
         windows: int, recorded: dict | None, log=print) -> Plan:
    """The micro-batch, accumulation and checkpointing for this run, the same on every rank.

    `windows`: the training blocks there are; `recorded`: the plan of the run being resumed.
    """
    target = cfg.tokens_per_step or (TOKENS_PER_STEP if cfg.batch_size == "auto" else None)
    unit = cfg.block_size * ranks.world  # the tokens of one sequence on every rank
    if target is not None and target < unit:
        on = f" on each of {ranks.world} processes" if ranks.world > 1 else ""
        raise PenwrightError(f"--tokens-per-step {target} is smaller than one block of {cfg.block_size} tokens{on}; "
                             f"give at least {unit}, or a smaller --block-size")
    if recorded and cfg.batch_size == "auto":  # the resumed run's choice: what makes its resume exact
        kept = Plan(**{k: v for k, v in recorded.items() if k in Plan.__dataclass_fields__})
        chosen = replace(kept, why=f"--batch-size auto: micro-batch {kept.batch_size} x accumulation "
                                   f"{kept.grad_accum}, as the run being resumed chose")
    elif cfg.batch_size == "auto":
        chosen = _search(cfg, model, ranks, device, dtype, windows, target)
    else:
        chosen = _fixed(cfg, target, unit)
    set_checkpointing(model, chosen.checkpointing)
    if chosen.why:
        log(chosen.why)
    return chosen


def _fixed(cfg: TrainConfig, target: int | None, unit: int) -> Plan:
    """A --batch-size N: its accumulation is --grad-accum, or what comes closest to --tokens-per-step."""
    checkpointing = cfg.gradient_checkpointing == "on"
    if target is None:
        return Plan(cfg.batch_size, cfg.grad_accum, checkpointing)
    accum = max(1, round(target / (cfg.batch_size * unit)))
    return Plan(cfg.batch_size, accum, checkpointing,
                f"--tokens-per-step {target:,}: accumulation {accum} of micro-batches of {cfg.batch_size} x block "
                f"{cfg.block_size} = {cfg.batch_size * accum * unit:,} tokens per step")


def _search(cfg: TrainConfig, model, ranks: distributed.Ranks, device: torch.device, dtype: torch.dtype,
            windows: int, target: int) -> Plan:
    """Rank 0 measures; every rank takes its answer, or its error."""
    if cfg.fsdp and ranks.world > 1:
        raise PenwrightError("--batch-size auto does not measure sharded (--fsdp) models yet; give --batch-size N")
    unit = cfg.block_size * ranks.world
    cap = max(1, min(math.ceil(target / unit), windows // ranks.world))  # no larger than the step or the data
    found = None
    if ranks.main:
        try:
            found = _largest_fitting(cfg, model, device, dtype, cap, ranks.world)
        except PenwrightError as e:
            found = e
    found = distributed.share(found, ranks)
    if isinstance(found, PenwrightError):
        raise found
    most, checkpointing, note, measured = found
    batch, accum = _split(target, unit, most)
    processes = f" x {ranks.world} processes" if ranks.world > 1 else ""
    return Plan(batch, accum, checkpointing,
                f"--batch-size auto: micro-batch {batch} x accumulation {accum} x block {cfg.block_size}{processes} = "
                f"{batch * accum * unit:,} tokens per step (--tokens-per-step {target:,}); {note}", measured)


def _split(target: int, unit: int, most: int) -> tuple[int, int]:
    """(micro-batch, accumulation): of the micro-batches up to `most` sequences, the one whose steps come
    closest to `target` tokens, and on a tie the largest (fewer, bigger micro-steps run faster)."""
    def accumulation(batch: int) -> int:
        return max(1, round(target / (unit * batch)))

    batch = min(range(1, most + 1), key=lambda b: (abs(b * accumulation(b) * unit - target), -b))
    return batch, accumulation(batch)


def _largest_fitting(cfg: TrainConfig, model, device: torch.device, dtype: torch.dtype, cap: int,
                     world: int) -> tuple[int, bool, str, dict]:
    """(micro-batch, gradient checkpointing, why, measurements) for the largest micro-batch that fits,
    up to `cap`; gradient checkpointing as --gradient-checkpointing says (auto: only if needed)."""
    model.to(device)
    model.train()
    budget, source = memory_budget(cfg, device, world)
    usable = int(budget * HEADROOM)
    extra = optimizer_bytes(model) + (parameter_bytes(model) if world > 1 else 0)  # AdamW's moments; DDP's buckets
    tries = {"on": [True], "off": [False], "auto": [False, True]}[cfg.gradient_checkpointing]
    for checkpointing in tries:
        set_checkpointing(model, checkpointing)
        trial = Trial(model, cfg, device, dtype)
        search = _search_cuda if device.type == "cuda" else _search_cpu
        batch = search(trial, usable - extra, cap)
        if batch:
            fits = ", all the step needs," if batch == cap else ""
            needed = " (one sequence does not fit without it)" if checkpointing and len(tries) > 1 else ""
            note = (f"{batch} sequences{fits} fit in {_size(usable)} ({HEADROOM:.0%} of {source}); gradient "
                    f"checkpointing {'on' if checkpointing else 'off'}{needed}")
            return batch, checkpointing, note, {"budget": usable, "optimizer": extra, "peaks": trial.peaks}
    one = trial.peaks.get("1")  # with checkpointing, if it was tried
    raise PenwrightError(_too_big(cfg, one + extra if one else None, usable, source))


def _too_big(cfg: TrainConfig, need: int | None, usable: int, source: str) -> str:
    fixes = [f"a smaller --block-size (now {cfg.block_size})"]
    if cfg.gradient_checkpointing == "off":
        fixes.append("--gradient-checkpointing on")
    if not cfg.lora and cfg.init == "pretrained":
        fixes.append("--lora r=16")
    needs = f"about {_size(need)}" if need else "more"
    return (f"--batch-size auto: not even one sequence of {cfg.block_size} tokens fits: a training step on it takes "
            f"{needs} in all, and {_size(usable)} ({HEADROOM:.0%} of {source}) is there; try " + ", ".join(fixes))


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --- the budget ---------------------------------------------------------------------------------

def memory_budget(cfg: TrainConfig, device: torch.device, world: int = 1) -> tuple[int, str]:
    """The bytes this process may hold at its peak, and where that number comes from.

    CPU: what it holds now plus the machine's available memory, within the cgroup's limit, shared
    by the processes of a torchrun on this machine. GPU: the device's free memory plus what PyTorch
    holds. Either way at most --memory-limit (or $PENWRIGHT_MEMORY_LIMIT).
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        found = [(free + torch.cuda.memory_reserved(device), f"{device}'s free memory")]
    else:
        rss = _status("VmRSS")
        found = [(rss + _meminfo("MemAvailable") // local, "available memory")]
        room = cgroup_room()
        if room is not None:  # what it holds is part of the room; the rest is shared with the other processes
            found.append((rss + (room - rss) // local, "the cgroup's memory limit"))
    text, flag = cfg.memory_limit, "--memory-limit"
    if not text:
        text, flag = os.environ.get(MEMORY_LIMIT), MEMORY_LIMIT
    if text:
        found.append((parse_size(text, flag), f"{flag} {text}"))
    return min(found)


def cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2 or v1) still lets it take, counting what it holds itself as
    free: the limit less the anonymous memory of the cgroup's other processes. None without a limit."""
    rooms = []
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not (v2 or "memory" in controllers.split(",")):
            continue
        root = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory")
        folder = root / path.lstrip("/")
        stat = dict(line.split() for line in _read(folder / "memory.stat").splitlines() if " " in line)
        if v2:  # the tightest limit of the cgroup and those above it
            limits = [_number(f / "memory.max") for f in (folder, *folder.parents) if f.is_relative_to(root)]
        else:  # v1 works that out itself
            limits = [_number(folder / "memory.limit_in_bytes"), int(stat.get("hierarchical_memory_limit", 1 << 62))]
        limit = min((n for n in limits if n is not None), default=1 << 62)
        if limit >= 2**60:  # "max", or v1's "no limit"
            continue
        anonymous = int(stat.get("anon" if v2 else "total_rss", 0))
        rooms.append(limit - max(0, anonymous - _status("RssAnon")))
    return min(rooms) if rooms else None


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _number(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (0 where there is none)."""
    return _field("/proc/self/status", key)


def _meminfo(key: str) -> int:
    """A figure of /proc/meminfo in bytes; without /proc, the machine's physical memory."""
    found = _field("/proc/meminfo", key)
    if found:
        return found
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62  # nothing known: only --memory-limit limits


def _field(path: str, key: str) -> int:
    for line in _read(path).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def optimizer_bytes(model) -> int:
    """AdamW's two moments of every trainable parameter, allocated at its first step."""
    return 2 * parameter_bytes(model)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# --- trial steps --------------------------------------------------------------------------------

class Trial:
    """Forward and backward of a micro-batch of `n` sequences, as training runs them, then the
    gradients dropped: no weight changes. `peak(n)` is the process's peak memory while it ran."""

    def __init__(self, model, cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        self.vocab = model.get_input_embeddings().num_embeddings
        self.peaks: dict[str, int] = {}  # micro-batch (as text, as JSON keeps it) -> the peak it reached

    def run(self, n: int) -> None:
        x = torch.arange(n * self.cfg.block_size, device=self.device).remainder_(self.vocab).view(n, -1)
        try:
            with autocast(self.device, self.dtype):
                loss = lm_loss(self.model, x, x, fused=self.cfg.head_loss == "chunked")
            loss.backward()
        finally:
            self.model.zero_grad(set_to_none=True)

    def peak(self, n: int) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.run(n)
            self.peaks[str(n)] = torch.cuda.max_memory_allocated(self.device)
        else:
            release_freed_memory()  # else a smaller trial after a larger one would start from its peak
            reset_peak_rss()
            self.run(n)
            self.peaks[str(n)] = peak_rss()
        return self.peaks[str(n)]


def reset_peak_rss() -> bool:
    """Start a new peak of resident memory (Linux: writing 5 to clear_refs); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The peak resident memory of this process since `reset_peak_rss` (or since it started), in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _search_cpu(trial: Trial, budget: int, cap: int, rounds: int = 4) -> int:
    """The largest micro-batch up to `cap` whose peak stays within `budget`, or 0.

    Only sizes predicted to fit are tried, one too many would get the process killed: each guess
    follows the line through the peaks of 1 sequence and of the latest size tried. That line is
    steeper at first than later (the loss's chunk of logits stops growing at 1,024 tokens), so a
    guess that fits is followed by a larger one, a few rounds at most."""
    before = _status("VmRSS")
    one = trial.peak(1)
    if one > budget or cap == 1 or one + (one - before) > budget:  # a second sequence adds at most what the first did
        return int(one <= budget)
    fits, fails, size = 1, cap + 1, 2  # the largest size that fitted, the smallest that did not, the next to try
    for _ in range(rounds):
        measured = trial.peak(size)
        if measured <= budget:
            fits = size
        else:
            fails = size
        per = max((measured - one) // (size - 1), 1)
        size = min(fails - 1, 1 + (budget - one) // per)
        if size <= fits:
            break
    return fits


def _search_cuda(trial: Trial, budget: int, cap: int) -> int:
    """The largest micro-batch up to `cap` that fits, or 0: doubling, then bisection, with PyTorch held
    to `budget`, so that a step that does not fit raises out-of-memory, which only says no."""
    device = trial.device
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(budget, 1) / total), device)
    fits, fails = 0, cap + 1  # the largest size that fitted, the smallest that did not
    try:
        while fits + 1 < fails:
            size = (fits + fails) // 2 if fails <= cap else min(max(1, 2 * fits), cap)
            try:
                trial.peak(size)
                fits = size
            except torch.OutOfMemoryError:
                fails = size
            if fails == size:  # outside the handler: its traceback no longer holds the step's tensors
                torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    return fits


# --- gradient checkpointing ---------------------------------------------------------------------

def checkpointing(model) -> bool:
    """Whether `model` (an HF model) recomputes its blocks' activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def set_checkpointing(model, on: bool) -> None:
    """Recompute each block's activations in backward (transformers' own checkpointing of its layers,
    non-reentrant: it composes with LoRA, the chunked loss and dropout, whose masks it replays)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    if on == checkpointing(base):
        return
    if on and not getattr(base, "supports_gradient_checkpointing", False):
        raise PenwrightError(f"--gradient-checkpointing: {type(base).__name__} does not support it; "
                             "use --gradient-checkpointing off")
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    if hasattr(base, "activation_checkpointing_enable"):
        if on:
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
