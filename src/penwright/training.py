"""The training loop: packed blocks from the token store, AdamW, warm-up + cosine, mixed precision.

Data order is a pure function of (seed, step), so the data position of a checkpoint is its step,
and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import inspect
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, distributed, lora
from .config import SampleConfig, TrainConfig
from .devices import keep_freed_memory, pick_device, pick_dtype
from .errors import PenwrightError
from .generate import Writer
from .kernels import fuse_gelu, use_cpu_attention
from .losses import IGNORE, linear_cross_entropy
from .models import context_length, fit_tokenizer, load_model, scratch_model
from .runs import RunDir
from .tokens import TokenStore, prepare


class Blocks:
    """Non-overlapping `block_size` windows of a token stream, shuffled per epoch.

    Micro-batch `i` is a pure function of (seed, i): epoch `i // per_epoch` uses its own
    permutation of the windows. Rank `r` of `world` takes its slice of each global batch.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray | None, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world: int = 1):
        self.tokens, self.mask, self.block = tokens, mask, block_size
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.windows = (len(tokens) - 1) // block_size
        self.per_epoch = self.windows // (batch_size * world)
        self._order = (None, None)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        first = (j * self.world + self.rank) * self.batch
        return self.rows(self._order[1][first:first + self.batch])

    def rows(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(windows, dtype=np.int64)[:, None] * self.block
        index = starts + np.arange(self.block + 1)
        chunk = torch.from_numpy(self.tokens[index].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[index[:, 1:]] == 0)] = IGNORE
        return x, y


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", fused: bool = True) -> torch.Tensor:
    """Next-token cross-entropy in fp32.

    `fused`: from the final hidden states through the head chunk by chunk (losses.py), never
    holding the whole logits, wherever the model allows it (`_head_weight`).
    """
    weight = _head_weight(model) if fused else None
    if weight is None:
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction=reduction)
    # logits_to_keep=1: the model's own head scores only the last position, which costs nothing
    out = model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    total = linear_cross_entropy(out.hidden_states[-1].flatten(0, 1), weight, y.flatten())
    return total if reduction == "sum" else total / (y != IGNORE).sum()


def _head_weight(model) -> torch.Tensor | None:
    """The head's weight when the fused loss can use it: a bias-free linear head, not sharded
    (FSDP), on a model whose forward can skip computing logits (`logits_to_keep`)."""
    inner = getattr(model, "module", model)  # inside DistributedDataParallel
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or hasattr(head.weight, "placements"):
        return None
    return head.weight if "logits_to_keep" in inspect.signature(inner.forward).parameters else None


def set_dropout(model, p: float | None, attention: float) -> None:
    """Override the model's dropout for this run (`p` None keeps its own); its saved config is untouched.

    Dropout on attention probabilities is set apart: at 0 PyTorch runs its fused attention kernel
    instead of the math path that keeps every attention matrix, faster and in far less memory.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            on_attention = "attn" in name.rsplit(".", 1)[-1] or "attention" in name.rsplit(".", 1)[-1]
            if on_attention or p is not None:
                module.p = attention if on_attention else p


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernels where this PyTorch has them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))


@dataclass
class Evaluator:
    blocks: Blocks | None
    dtype: torch.dtype

    @classmethod
    def over(cls, store: TokenStore, block_size: int, dtype) -> "Evaluator":
        tokens = store.tokens("val")
        if len(tokens) < 2:
            return cls(None, dtype)
        block = min(block_size, len(tokens) - 1)
        return cls(Blocks(tokens, store.mask("val"), block, 1, 0), dtype)

    @torch.no_grad()
    def loss(self, model, max_batches: int | None = None, batch_size: int = 8) -> float:
        """Token-weighted mean loss over the first `max_batches` batches of validation windows."""
        if self.blocks is None:
            return float("nan")
        device = next(model.parameters()).device
        windows = list(range(self.blocks.windows))
        if max_batches is not None:
            windows = windows[:max_batches * batch_size]
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, len(windows), batch_size):
            x, y = self.blocks.rows(windows[start:start + batch_size])
            with autocast(device, self.dtype):
                total += lm_loss(model, x.to(device), y.to(device), reduction="sum").double().cpu()
            count += int((y != IGNORE).sum())
        model.train(was_training)
        return total.item() / max(count, 1)


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish its step, save and exit cleanly."""

    def __init__(self):
        self.raised = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.raised is not None:  # a second Ctrl+C: stop now
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class FiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite; stops after too many.

    The decision stays on the device (fused AdamW reads `found_inf` and skips its update, as it
    does for GradScaler), so the loop gains no host sync; `check` reads the count at log and save
    time, where the loop syncs anyway.
    """

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # first skipped step, 0: none

    def step(self, optimizer, loss: torch.Tensor, norm: torch.Tensor, step: int) -> torch.Tensor:
        """`optimizer.step()` unless `loss` or `norm` is not finite; returns whether it skipped."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()
            optimizer.step()
        elif not bad.item():  # an unfused optimizer needs the answer on the host
            optimizer.step()
        self.skipped += bad
        self.first = torch.where(bad & (self.first == 0), step, self.first)
        return bad

    def check(self, step: int, last_checkpoint: Path | None) -> None:
        skipped = int(self.skipped)
        if skipped > self.limit:
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise PenwrightError(
                f"training stopped at step {step}: {skipped} steps had a non-finite loss or gradient (the first at "
                f"step {int(self.first)}), more than --max-bad-steps {self.limit}; {kept}. Try a lower --lr or "
                "--precision fp32, or look for broken text in the corpus")


@contextmanager
def memory_hint(cfg: TrainConfig):
    """Running out of GPU or host memory becomes advice instead of a traceback."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not any(
                sign in str(e) for sign in ("out of memory", "can't allocate memory")):
            raise
        smaller = (f"e.g. --batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2}" if cfg.batch_size > 1
                   else "or a smaller --block-size or model")
        raise PenwrightError(f"out of memory with --batch-size {cfg.batch_size} and --block-size {cfg.block_size}: "
                             f"use a smaller batch with more accumulation ({smaller}); continue with --resume") from None


def train(cfg: TrainConfig, log=print) -> Path:
    """Fine-tune (or train from scratch) as `cfg` says; returns the run directory.

    Under torchrun every process calls this and trains on its share of each batch (distributed.py).
    """
    ranks, device = distributed.setup(pick_device(cfg.device))
    try:
        return _train(cfg, ranks, device, log if ranks.main else _quiet)
    except PenwrightError:
        if ranks.main:
            raise
        raise SystemExit(2) from None  # every rank met the same problem; rank 0 alone reports it
    finally:
        distributed.teardown()


def _quiet(*_) -> None:
    """The log of ranks other than 0."""


def _train(cfg: TrainConfig, ranks: distributed.Ranks, device: torch.device, log) -> Path:
    from tqdm.auto import tqdm

    with distributed.main_first(ranks):  # rank 0 claims the run dir and fills the token cache first
        run = RunDir.claim(cfg) if ranks.main else RunDir(Path(cfg.out))
        store = prepare(cfg, log)
    # Rank 0 alone verifies the checkpoints' checksums.
    resume_from = distributed.share(checkpoint.latest(run.path, log) if cfg.resume and not run.replace and ranks.main else None, ranks)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu" and cfg.malloc == "keep":
        keep_freed_memory()
    dtype = pick_dtype(cfg.precision, device)
    tokenizer = store.tokenizer()

    torch.manual_seed(cfg.seed)  # the same on every rank: same initial weights, same dropout stream
    if resume_from and not cfg.lora:  # a LoRA checkpoint holds only the adapter
        model = load_model(str(resume_from))
    elif cfg.init == "scratch":
        model = scratch_model(cfg.preset, tokenizer)
    else:
        model = load_model(cfg.model, cfg.allow_pickle, cfg.trust_remote_code)
    fit_tokenizer(model, tokenizer)
    fuse_gelu(model)
    if device.type == "cpu" and cfg.attention == "auto":
        use_cpu_attention(model)
    set_dropout(model, cfg.dropout, cfg.attention_dropout)
    if cfg.lora:
        model = lora.attach(model, cfg.lora_spec, cfg.model, adapter=resume_from)
    block_size = cfg.block_size or min(context_length(model), 512)
    if block_size > context_length(model):
        raise PenwrightError(f"--block-size {block_size} exceeds the model's context of {context_length(model)} tokens")
    settings, cfg = cfg, replace(cfg, block_size=block_size)
    blocks = _training_blocks(store, cfg, ranks.rank, ranks.world)
    if ranks.main:
        run.create()  # only now that data, model and settings are known to be good
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * blocks.per_epoch / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 20)

    model.train()
    net = distributed.wrap(model, ranks, device, cfg.fsdp)  # on the device; what the training step runs
    sharded = cfg.fsdp and ranks.world > 1
    if cfg.fsdp and not sharded:
        log("--fsdp: a single process has nothing to shard with; training unsharded (start with torchrun or --nproc)")
    optimizer = make_optimizer(model, cfg, device)
    # Compiling the step alone leaves evaluation and sampling, whose shapes vary, uncompiled.
    step_loss = torch.compile(lm_loss) if cfg.compile else lm_loss
    step = 0
    if resume_from:
        state = checkpoint.load_state(resume_from)
        distributed.load_optimizer(model, optimizer, state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step = state["step"]
        if ranks.main:
            run.forget_after(step)
        log(f"resuming from {resume_from} (step {step})")
    elif cfg.resume:
        log("no checkpoint to resume from; starting a new run")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * block_size * ranks.world
    if ranks.main:
        run.write_info(settings, stats=store.stats, block_size=block_size, total_steps=total, processes=ranks.world,
                       tokens_per_step=tokens_per_step)
    evaluator = Evaluator.over(store, block_size, dtype)
    writer = Writer(model, tokenizer, autocast=dtype if dtype != torch.float32 else None, log=log)
    sampling = SampleConfig(max_new_tokens=cfg.sample_length, seed=cfg.seed)
    _announce(log, store, cfg, total, tokens_per_step, device, dtype, ranks.world)

    if step == 0:
        before = evaluator.loss(model, cfg.eval_batches)  # on every rank: a sharded model needs them all
        if ranks.main:
            run.log({"step": 0, "val_loss": before, "val_ppl": _ppl(before)})
    else:
        before = next((r["val_loss"] for r in run.metrics() if r.get("step") == 0 and "val_loss" in r), float("nan"))

    guard, last_saved, start = FiniteGuard(cfg.max_bad_steps, device), resume_from, step

    def save(at_step: int) -> Path:
        nonlocal last_saved
        guard.check(at_step, last_saved)  # never checkpoint a run past its limit of skipped steps
        weights, optimizer_state = distributed.full_state(model, optimizer, sharded)  # all ranks gather
        state = {"step": at_step, "optimizer": optimizer_state,
                 "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}}
        if ranks.main:
            last_saved = checkpoint.save(run.path, at_step, model, tokenizer, state, cfg.keep_checkpoints, weights)
        return last_saved

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="training",
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ranks.main)
    running, timer, counted = torch.zeros((), device=device), time.perf_counter(), 0
    good = torch.zeros((), device=device)  # steps in this log window that were not skipped
    with StopFlag() as stop, memory_hint(cfg):
        while step < total:
            lr = lr_at(step, cfg.peak_lr, warmup, total, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            summed = 0  # this step's micro-batch losses
            for micro in range(cfg.grad_accum):
                x, y = blocks.get(step * cfg.grad_accum + micro)
                with distributed.sync_gradients(net, now=micro == cfg.grad_accum - 1):
                    with autocast(device, dtype):
                        loss = step_loss(net, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                         fused=cfg.head_loss == "chunked")
                    (loss / cfg.grad_accum).backward()
                summed = summed + loss.detach()
            # With --grad-clip 0 an infinite limit only measures the norm, which the guard needs.
            norm = distributed.plain(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
            bad = guard.step(optimizer, summed, norm, step + 1)
            running += torch.where(bad, 0.0, summed)
            good += ~bad
            optimizer.zero_grad(set_to_none=True)
            step += 1
            counted += 1
            bar.update(1)
            stopping = distributed.agree(stop.raised, ranks, device)
            if step % cfg.log_every == 0 or step == total or stopping:
                # the loop's host sync; the loss is the mean over ranks
                loss_sum, good_steps = distributed.mean(torch.stack([running, good]), ranks).tolist()
                mean = loss_sum / (good_steps * cfg.grad_accum) if good_steps else float("nan")
                speed = counted * tokens_per_step / (time.perf_counter() - timer)
                skipped = {"skipped_steps": counted - int(good_steps)} if good_steps < counted else {}
                if ranks.main:
                    run.log({"step": step, "loss": mean, "lr": lr, "tokens_per_s": speed,  # tokens: all ranks'
                             "tokens": step * tokens_per_step, "processes": ranks.world, **skipped})
                bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{speed:,.0f}")
                guard.check(step, last_saved)
                running.zero_()
                good.zero_()
                timer, counted = time.perf_counter(), 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                val = evaluator.loss(model, cfg.eval_batches)
                if ranks.main:
                    run.log({"step": step, "val_loss": val, "val_ppl": _ppl(val)})
                    bar.write(f"step {step}: validation loss {val:.4f}, perplexity {_ppl(val):.2f}")
            if cfg.sample_every and step % cfg.sample_every == 0 and ranks.main and not sharded:
                text = writer.samples([None], sampling)[0].text
                run.log({"step": step, "sample": text})
                bar.write(f"--- sample at step {step} ---\n{text}\n---")
            if stopping and step < total:
                where = save(step)
                bar.close()
                log(f"stopped by {stopping} at step {step}; checkpoint {where}. "
                    f"Continue with the same command plus --resume")
                return run.path
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save(step)
    bar.close()
    if step > start:  # a run resumed at its last step has that checkpoint already
        save(step)
    if not ranks.main:
        return run.path
    if sharded:  # rank 0 cannot run a sharded model alone: reload the full one just saved
        model = load_model(str(last_saved)).to(device)
        writer = Writer(model, tokenizer, autocast=writer.autocast, log=log)
    return _finish(run, settings, block_size, model, tokenizer, store, evaluator, writer, sampling, before, log)


def _training_blocks(store: TokenStore, cfg: TrainConfig, rank: int = 0, world: int = 1) -> Blocks:
    tokens = store.tokens("train")
    blocks = Blocks(tokens, store.mask("train"), cfg.block_size, cfg.batch_size, cfg.seed, rank, world)
    if blocks.windows == 0:
        fits = 1 << max(3, (len(tokens) - 2).bit_length() - 1)
        hint = f"use --block-size {fits} or less, or add text" if len(tokens) > 9 else "add more text"
        raise PenwrightError(f"the training split has {len(tokens)} tokens, fewer than one block of "
                             f"{cfg.block_size}+1; {hint}")
    if blocks.per_epoch == 0:
        raise PenwrightError(f"the training split holds {blocks.windows} blocks of {cfg.block_size} tokens, fewer "
                             f"than one batch of {cfg.batch_size * world}; use --batch-size {blocks.windows // world} "
                             "or a smaller --block-size")
    return blocks


def _announce(log, store, cfg, total, tokens_per_step, device, dtype, world) -> None:
    s = store.stats
    labels = ", ".join(f"{k}={v}" for k, v in s["labels"].items())
    log(f"corpus: {s['files']} files, {s['documents']} documents, {s['characters']:,} characters, "
        f"{s['tokens']:,} tokens ({s['train_tokens']:,} train / {s['val_tokens']:,} validation)"
        + (f"; labels: {labels}" if labels else ""))
    processes = f" x {world} processes" if world > 1 else ""
    log(f"training {total} steps of {tokens_per_step:,} tokens (batch {cfg.batch_size} x accumulation "
        f"{cfg.grad_accum} x block {cfg.block_size}{processes}), lr {cfg.peak_lr:g}, on {device} in "
        f"{str(dtype).split('.')[-1]}")
    if world > 1:
        log(f"effective batch: {cfg.batch_size * cfg.grad_accum * world} sequences; on N processes, "
            f"--batch-size {cfg.batch_size * world}/N keeps it and the lr")


def _finish(run, cfg, block_size, model, tokenizer, store, evaluator, writer, sampling, before, log) -> Path:
    """Final evaluation on the whole validation split, samples, the HF model, plot and card."""
    after = evaluator.loss(model)
    run.log({"step": run.metrics()[-1]["step"] if run.metrics() else 0, "val_loss": after, "val_ppl": _ppl(after)})
    samples = [s.text for s in writer.samples([None], replace(sampling, num_samples=3))]
    checkpoint.publish_model(run.path, model, tokenizer)
    results = {"validation loss": f"{after:.4f}", "validation perplexity": f"{_ppl(after):.2f}",
               "validation perplexity before training": f"{_ppl(before):.2f}"}
    if cfg.eval_at_end:
        from .evaluation import end_of_training

        results.update(end_of_training(writer, cfg, log))
    run.write_info(cfg, stats=store.stats, block_size=block_size, results={"val_loss": after, "val_ppl": _ppl(after),
                                                    "val_loss_before": before, "val_ppl_before": _ppl(before)})
    run.plot_loss()
    run.write_card(cfg, store.stats, results, samples)
    log(f"validation perplexity: {_ppl(before):.2f} before, {_ppl(after):.2f} after training")
    log(f"model saved to {run.path}")
    return run.path


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50)) if math.isfinite(loss) else float("nan")
