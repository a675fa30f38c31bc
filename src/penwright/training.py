"""Training: `setup` assembles a run, `fit` is the loop, `finish` publishes the model.

    train(cfg)  =  setup(cfg) -> Trainer  ->  fit(trainer)  ->  finish(trainer)

`setup` claims the run dir, prepares the data, builds the model and optimizer and restores a
resumed run; it trains nothing, so a test can build one and look inside. `fit` runs optimizer
steps until the planned total, with logs, evaluations, samples and checkpoints on their own
schedules. Data order is a pure function of (seed, step) (batches.py), and so is dropout
(`step_seed`), which is what makes a resumed run exact.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed, lora, memory
from .batches import Blocks, Evaluator, training_blocks
from .config import SampleConfig, TrainConfig
from .devices import autocast, keep_freed_memory, pick_device, pick_dtype
from .errors import PenwrightError
from .generate import Chat, Writer
from .guards import EarlyStop, FiniteGuard, StopFlag, memory_hint
from .kernels import fuse_gelu, use_cpu_attention
from .losses import keeps_packed_apart, lm_loss
from .models import MAX_DEFAULT_BLOCK, context_length, fit_tokenizer, load_model, scratch_model
from .runs import RunDir, release, this_process
from .tokens import TokenStore, prepare
from .words import plural


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


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the dropout masks of one rank's optimizer step: each rank draws its own masks, and
    a resumed run draws the same ones as an uninterrupted run, on any number of processes."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# Under LoRA the new (control) tokens' rows learn this much faster than the adapters: at the adapters'
# lr, a dozen steps move them by 4% of their length, too little for a label to take hold.
NEW_TOKEN_LR_SCALE = 10.0


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernels where this PyTorch has them.

    A group's "lr_scale" multiplies the schedule's lr (see the loop)."""
    rows = lora.new_token_rows(model)
    params = [p for p in model.parameters() if p.requires_grad and not any(p is r for r in rows)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0, "lr_scale": NEW_TOKEN_LR_SCALE})
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))


@dataclass
class Trainer:
    """Everything one process's training needs, as `setup` leaves it; `fit` moves `step` on."""

    cfg: TrainConfig  # with the block size filled in
    settings: TrainConfig  # as given: what penwright.json records and a resume compares
    ranks: distributed.Ranks
    device: torch.device
    dtype: torch.dtype
    run: RunDir
    store: TokenStore
    tokenizer: object
    model: torch.nn.Module  # the plain model: what is saved, evaluated and sampled
    net: torch.nn.Module  # what the training step runs: the model itself, DDP around it, or sharded by FSDP
    optimizer: torch.optim.Optimizer
    blocks: Blocks
    evaluator: Evaluator
    writer: Writer
    total: int  # optimizer steps planned
    warmup: int
    step: int  # optimizer steps done
    start: int  # the step this process started from
    guard: FiniteGuard
    loss: object  # lm_loss, or its torch.compile'd self (the step alone: evaluation's shapes vary)
    last_saved: Path | None  # the newest checkpoint
    before: float  # validation loss before training
    plan: memory.Plan | None = None  # micro-batch, accumulation, checkpointing (--batch-size auto chooses)
    best: EarlyStop | None = None  # the best periodic evaluation, for --early-stop and --keep-best
    shown: dict = field(default_factory=dict)  # what the progress bar shows after the step count

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.block_size * self.ranks.world

    @property
    def sharded(self) -> bool:
        return self.cfg.fsdp and self.ranks.world > 1


def train(cfg: TrainConfig, log=print) -> Path:
    """Fine-tune (or train from scratch) as `cfg` says; returns the run directory.

    Under torchrun every process calls this and trains on its share of each batch (distributed.py).
    """
    ranks, device = distributed.setup(pick_device(cfg.device))
    log = log if ranks.main else _quiet
    trainer = None
    try:
        trainer = setup(cfg, ranks, device, log)
        stopped_by = fit(trainer, log)
        if stopped_by:
            if ranks.main:  # what `penwright runs` tells a stopped run from a crashed one by
                trainer.run.log({"step": trainer.step, "stopped": stopped_by})
            log(f"stopped by {stopped_by} at step {trainer.step}; checkpoint {trainer.last_saved}. "
                f"Continue with the same command plus --resume")
            raise Stopped(stopped_by)
        return finish(trainer, log) if ranks.main else trainer.run.path
    except PenwrightError:
        if ranks.main:
            raise
        raise SystemExit(2) from None  # every rank met the same problem; rank 0 alone reports it
    except Exception as e:
        if ranks.main or not distributed.peer_failed(e):
            raise
        print(f"penwright: rank {ranks.rank}: stopping because another process failed (rank 0 says why)",
              file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if trainer:
            _leave(trainer, sys.exc_info()[1])
        if ranks.main and cfg.out:
            release(Path(cfg.out))  # the run dir's lock, which `setup` took
        distributed.teardown()


def _leave(t: Trainer, error: BaseException | None) -> None:
    """Close the viewers; an error (not a stop, which saved and said so) is noted in metrics.jsonl, so
    that `penwright runs` calls the run crashed even while the process that ran it lives on (a notebook)."""
    t.run.close()
    if error is not None and not isinstance(error, Stopped) and t.ranks.main and t.run.metrics_path.exists():
        try:
            t.run.log({"step": t.step, "crashed": f"{type(error).__name__}: {error}".splitlines()[0][:300]})
        except (OSError, PenwrightError):  # a full disk: the error itself says so
            pass


class Stopped(KeyboardInterrupt):
    """Training stopped early by a signal (its name is the message), its checkpoint saved, so that
    `penwright train ... && penwright generate ...` does not go on: the CLI exits 130, as for Ctrl+C."""


def _quiet(*_) -> None:
    """The log of ranks other than 0."""


# --- setup --------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, ranks: distributed.Ranks, device: torch.device, log=print) -> Trainer:
    """Claim the run dir, prepare the data, build the model and optimizer, restore a resumed run,
    and write the run's settings and first evaluation. Trains nothing."""
    with distributed.main_first(ranks):  # rank 0 claims the run dir and fills the token cache first
        run = RunDir.claim(cfg) if ranks.main else RunDir(Path(cfg.out))
        store = prepare(cfg, log)
    # Rank 0 alone verifies the checkpoints' checksums.
    resume_from = distributed.share(checkpoint.latest(run.path, log) if cfg.resume and not run.replace and ranks.main
                                    else None, ranks)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu" and cfg.malloc == "keep":
        keep_freed_memory()
    dtype = pick_dtype(cfg.precision, device)
    tokenizer = store.tokenizer()
    model = build_model(cfg, tokenizer, device, resume_from)
    settings, cfg = cfg, replace(cfg, block_size=_block_size(cfg, model))
    plan = _plan(cfg, run, model, ranks, device, dtype, store, resume_from, log)
    cfg = replace(cfg, batch_size=plan.batch_size, grad_accum=plan.grad_accum, tokens_per_step=None)
    blocks = training_blocks(store, cfg, ranks.rank, ranks.world, log)
    if store.conversations:
        _check_chat_training(cfg, store, model)
    if ranks.main:
        run.create()  # only now that data, model and settings are known to be good
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * blocks.per_epoch / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 20)
    model.train()
    net = distributed.wrap(model, ranks, device, cfg.fsdp)  # moves the model to the device
    if cfg.fsdp and ranks.world == 1:
        log("--fsdp: a single process has nothing to shard with; training unsharded (start with torchrun or --nproc)")
    evaluator = Evaluator.over(store, cfg.block_size, dtype, cfg.truncate)
    trainer = Trainer(cfg, settings, ranks, device, dtype, run, store, tokenizer, model, net,
                      make_optimizer(model, cfg, device), blocks, evaluator,
                      Writer(model, tokenizer, autocast=dtype if dtype != torch.float32 else None, log=log),
                      total, warmup, 0, 0, FiniteGuard(cfg.max_bad_steps, device),
                      torch.compile(lm_loss) if cfg.compile else lm_loss, resume_from, float("nan"), plan)
    _restore(trainer, resume_from, log)
    _watch(trainer)
    _write_info(trainer)
    _announce(trainer, log)
    trainer.before = _first_evaluation(trainer, log)
    return trainer


def build_model(cfg: TrainConfig, tokenizer, device: torch.device, resume_from: Path | None):
    """The model to train: from the checkpoint, from scratch or pretrained; with its embeddings fitted to
    the tokenizer, the faster kernels swapped in, this run's dropout and, with --lora, adapters."""
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    if resume_from and not cfg.lora:  # a LoRA checkpoint holds only the adapter
        model = load_model(str(resume_from))
    elif cfg.init == "scratch":
        model = scratch_model(cfg.preset, tokenizer)
    else:
        model = load_model(cfg.model, cfg.allow_pickle, cfg.trust_remote_code)
    new_tokens = fit_tokenizer(model, tokenizer)
    fuse_gelu(model)
    if device.type == "cpu" and cfg.attention == "auto":
        use_cpu_attention(model)
    set_dropout(model, cfg.dropout, cfg.attention_dropout)
    if cfg.lora:
        model = lora.attach(model, cfg.lora_spec, cfg.model, adapter=resume_from, new_tokens=new_tokens)
    return model


def _check_chat_training(cfg: TrainConfig, store: TokenStore, model) -> None:
    """Refuse what would train conversations wrongly: LoRA with new chat markers it cannot learn, or a model
    whose attention would let packed conversations read each other."""
    if cfg.lora and store.manifest.get("chat_tokens_added"):
        raise PenwrightError(f"--lora cannot learn the chat markers {', '.join(store.manifest['chat_tokens_added'])} "
                             f"that {cfg.model} lacks (it has no chat template of its own): train every weight, "
                             "or adapt a chat model")
    if not keeps_packed_apart(model):
        raise PenwrightError(f"{cfg.model}: this model's attention ignores restarting positions, so "
                             "conversations packed together would read each other; it cannot train on them")


def _plan(cfg: TrainConfig, run: RunDir, model, ranks: distributed.Ranks, device: torch.device, dtype: torch.dtype,
          store: TokenStore, resume_from: Path | None, log) -> memory.Plan:
    """The micro-batch and accumulation (--batch-size auto measures them; a resumed run keeps its own)."""
    recorded = distributed.share(run.read_info().get("batch") if resume_from and ranks.main else None, ranks)
    windows = (len(store.tokens("train")) - 1) // cfg.block_size
    return memory.plan(cfg, model, ranks, device, dtype, windows, recorded, log)


def _block_size(cfg: TrainConfig, model) -> int:
    block_size = cfg.block_size or min(context_length(model), MAX_DEFAULT_BLOCK)
    if block_size > context_length(model):
        raise PenwrightError(f"--block-size {block_size} exceeds the model's context of {context_length(model)} tokens")
    return block_size


def _restore(t: Trainer, resume_from: Path | None, log) -> None:
    """A resumed run takes the checkpoint's optimizer state and step (its weights are already loaded)."""
    if resume_from is None:
        if t.cfg.resume:
            log("no checkpoint to resume from; starting a new run")
        return
    state = checkpoint.load_state(resume_from)
    if state.get("optimizer") is None:
        log(f"warning: {resume_from} holds no optimizer state (saved with --no-save-optimizer): the optimizer "
            "restarts from nothing, so the run goes on from these weights but not exactly as an uninterrupted one")
    else:
        distributed.load_optimizer(t.model, t.optimizer, state["optimizer"])
    t.step = t.start = state["step"]
    if t.ranks.main:
        t.run.forget_after(t.step)
    log(f"resuming from {resume_from} (step {t.step})")


def _watch(t: Trainer) -> None:
    """The best evaluation so far (a resumed run's, from metrics.jsonl) and the viewer of --log."""
    t.best = distributed.share(EarlyStop.replay(t.cfg.early_stop, t.run.metrics(), t.step) if t.ranks.main
                               else None, t.ranks)
    if t.cfg.log and t.ranks.main:
        from .viewers import open_viewer

        t.run.mirrors.append(open_viewer(t.cfg.log, t.run.path, purge_step=t.step + 1 if t.step else None))


def _write_info(t: Trainer, **results) -> None:
    if t.ranks.main:
        t.run.write_info(t.settings, stats=t.store.stats, block_size=t.cfg.block_size, total_steps=t.total,
                         processes=t.ranks.world, tokens_per_step=t.tokens_per_step, batch=t.plan.record(),
                         process=this_process(), **results)


def _first_evaluation(t: Trainer, log) -> float:
    """The validation loss before training (on a resumed run, the one recorded at step 0)."""
    if t.step > 0:
        return next((r["val_loss"] for r in t.run.metrics() if r.get("step") == 0 and "val_loss" in r), float("nan"))
    batches = plural(t.evaluator.batches(t.cfg.eval_batches), "batch", "batches")
    log(f"validation before training: {batches} of {t.evaluator.batch_size} x {t.evaluator.block} tokens "
        "(--eval-batches sets how many) ...")
    before = t.evaluator.loss(t.model, t.cfg.eval_batches)  # on every rank: a sharded model needs them all
    if t.ranks.main:
        t.run.log({"step": 0, "val_loss": before, "val_ppl": _ppl(before)})
    log(f"validation perplexity before training: {_ppl(before):.2f}")
    return before


def _announce(t: Trainer, log) -> None:
    s, cfg = t.store.stats, t.cfg
    labels = ", ".join(f"{k}={v}" for k, v in s["labels"].items())
    reflowed = f" ({s['reflowed_files']} hard-wrapped, reflowed)" if s.get("reflowed_files") else ""
    log(f"corpus: {plural(s['files'], 'file')}{reflowed}, {plural(s['documents'], 'document')}, "
        f"{plural(s['characters'], 'character')}, {plural(s['tokens'], 'token')} "
        f"({s['train_tokens']:,} train / {s['val_tokens']:,} validation)"
        + (f"; labels: {labels}" if labels else "")
        + (f" and {s['unlabelled_documents']:,} unlabelled" if labels and s.get("unlabelled_documents") else ""))
    processes = f" x {t.ranks.world} processes" if t.ranks.world > 1 else ""
    log(f"training {plural(t.total, 'step')} of {t.tokens_per_step:,} tokens (batch {cfg.batch_size} x accumulation "
        f"{cfg.grad_accum} x block {cfg.block_size}{processes}), lr {cfg.peak_lr:g}, on {t.device} in "
        f"{str(t.dtype).split('.')[-1]}")
    if t.ranks.world > 1:
        log(f"effective batch: {cfg.batch_size * cfg.grad_accum * t.ranks.world} sequences; on N processes, "
            f"--batch-size {cfg.batch_size * t.ranks.world}/N keeps it and the lr")


# --- the loop -----------------------------------------------------------------------------------

def fit(t: Trainer, log=print) -> str | None:
    """Optimizer steps until the planned total, or until --early-stop's evaluations stop getting better.
    Returns what stopped it early (a signal's name, after saving a checkpoint), or None when it ended."""
    cfg, meter = t.cfg, Meter(t.device)
    bar = _progress_bar(t)
    with StopFlag() as stop, memory_hint(cfg):
        while t.step < t.total and not t.best.exhausted:
            # One optimizer step: grad_accum micro-batches, clipped, skipped if not finite.
            lr = lr_at(t.step, cfg.peak_lr, t.warmup, t.total, cfg.min_lr_ratio)
            loss, bad = train_step(t, lr)
            t.step += 1
            meter.add(loss, bad)
            bar.update(1)
            stopping = distributed.agree(stop.raised, t.ranks, t.device)
            last = t.step == t.total

            # The loop's host sync: loss (the mean over ranks) and speed, to metrics.jsonl and the bar.
            if t.step % cfg.log_every == 0 or last or stopping:
                _log_progress(t, meter, lr, bar)
            # Evaluation and samples on their own schedules (the final ones are finish's).
            if _evaluation_due(t, last):
                _evaluate(t, bar)
            if cfg.sample_every and t.step % cfg.sample_every == 0 and t.ranks.main and not t.sharded:
                text = t.writer.samples([_sample_prompt(t)], _sampling(t))[0].text
                t.run.log({"step": t.step, "sample": text})
                bar.write(f"--- sample at step {t.step} ---\n{text}\n---")
            # Checkpoints: on schedule, at the end (early stopping's too), and when asked to stop.
            if stopping and not last:
                save(t)
                bar.close()
                return stopping
            if last or t.best.exhausted or (cfg.save_every and t.step % cfg.save_every == 0):
                save(t)
    bar.close()
    return None


def train_step(t: Trainer, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at learning rate `lr`: the summed micro-batch losses and whether it was skipped."""
    cfg = t.cfg
    for group in t.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    torch.manual_seed(step_seed(cfg.seed, t.ranks.rank, t.step))
    summed = torch.zeros((), device=t.device)
    for micro in range(cfg.grad_accum):
        x, y, positions = (None if a is None else a.to(t.device, non_blocking=True)
                           for a in t.blocks.get(t.step * cfg.grad_accum + micro))
        with distributed.sync_gradients(t.net, now=micro == cfg.grad_accum - 1):
            with autocast(t.device, t.dtype):
                loss = t.loss(t.net, x, y, fused=cfg.head_loss == "chunked", positions=positions)
            (loss / cfg.grad_accum).backward()
        summed = summed + loss.detach()
    # With --grad-clip 0 an infinite limit only measures the norm, which the guard needs.
    norm = distributed.plain(torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip or math.inf))
    bad = t.guard.step(t.optimizer, summed, norm, t.step + 1)
    t.optimizer.zero_grad(set_to_none=True)
    return summed, bad


class Meter:
    """The losses and speed of the steps since the last log line, kept on the device until then."""

    def __init__(self, device: torch.device):
        self.running = torch.zeros((), device=device)
        self.good = torch.zeros((), device=device)  # steps not skipped
        self.reset()

    def reset(self) -> None:
        self.running.zero_()
        self.good.zero_()
        self.timer, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.running += torch.where(bad, 0.0, loss)
        self.good += ~bad
        self.steps += 1


def _log_progress(t: Trainer, meter: Meter, lr: float, bar) -> None:
    loss_sum, good_steps = distributed.mean(torch.stack([meter.running, meter.good]), t.ranks).tolist()
    mean = loss_sum / (good_steps * t.cfg.grad_accum) if good_steps else float("nan")
    speed = meter.steps * t.tokens_per_step / (time.perf_counter() - meter.timer)
    skipped = {"skipped_steps": meter.steps - int(good_steps)} if good_steps < meter.steps else {}
    if t.ranks.main:
        t.run.log({"step": t.step, "loss": mean, "lr": lr, "tokens_per_s": speed,  # tokens: all ranks'
                   "tokens": t.step * t.tokens_per_step, "processes": t.ranks.world, **skipped})
    t.shown.update(loss=f"{mean:.3f}", tok_s=f"{speed:,.0f}")
    bar.set_postfix(t.shown)
    t.guard.check(t.step, t.last_saved)
    meter.reset()


def _evaluation_due(t: Trainer, last: bool) -> bool:
    """Every --eval-every steps; at the last step only to compare the last weights with the best
    (--keep-best): the final evaluation, on the whole split, is finish's."""
    every = t.cfg.eval_every
    return bool(every) and (t.step % every == 0 and not last or last and t.cfg.keeps_best)


def _evaluate(t: Trainer, bar) -> None:
    """A periodic evaluation: logged, shown, counted for --early-stop, and with --keep-best the weights
    saved apart when they are the best so far."""
    val = t.evaluator.loss(t.model, t.cfg.eval_batches)  # on every rank: a sharded model needs them all
    val = distributed.share(val, t.ranks)  # rank 0's, so that every rank stops early alike
    best = t.best.update(t.step, val)
    if t.ranks.main:
        t.run.log({"step": t.step, "val_loss": val, "val_ppl": _ppl(val)})
        bar.write(f"step {t.step}: validation loss {val:.4f}, perplexity {_ppl(val):.2f}"
                  + (" (the best so far)" if best and t.cfg.keeps_best else ""))
    t.shown["val_ppl"] = f"{_ppl(val):.2f}"
    bar.set_postfix(t.shown)
    if best and t.cfg.keeps_best:
        save_best(t)


def save(t: Trainer) -> Path | None:
    """Checkpoint the current step (every rank takes part: under FSDP they gather the weights)."""
    t.guard.check(t.step, t.last_saved)  # never checkpoint a run past its limit of skipped steps
    weights, optimizer_state = distributed.full_state(t.model, t.optimizer if t.cfg.save_optimizer else None,
                                                      t.sharded)
    if t.ranks.main:
        t.last_saved = checkpoint.save(t.run.path, t.step, t.model, t.tokenizer,
                                       {"step": t.step, "optimizer": optimizer_state}, t.cfg.keep_checkpoints, weights)
    return t.last_saved


def save_best(t: Trainer) -> None:
    """The current weights to checkpoints/best (every rank takes part, as in `save`)."""
    weights = distributed.full_weights(t.model, t.sharded)
    if t.ranks.main:
        checkpoint.save_best(t.run.path, t.step, t.model, t.tokenizer, t.best.loss, weights)


def _progress_bar(t: Trainer):
    from tqdm.auto import tqdm

    return tqdm(total=t.total, initial=t.step, unit="step", dynamic_ncols=True, desc="training",
                mininterval=0.5 if sys.stderr.isatty() else 30, disable=not t.ranks.main)


def _sample_prompt(t: Trainer) -> Chat | None:
    """What samples start from: nothing for plain text; for conversations, the first validation (else
    training) conversation up to its first reply, which the sample then writes."""
    if not t.store.conversations or t.cfg.train_on == "all":  # with all, no reply to find
        return None
    split = "val" if t.store.manifest["val_tokens"] else "train"
    start, end = t.store.starts(split)[:2]
    reply = int(np.argmax(t.store.mask(split)[start:end]))  # the first learned token
    prompt = t.store.tokens(split)[start:start + reply].tolist()
    return Chat(t.tokenizer.decode(prompt, skip_special_tokens=False))


def _sampling(t: Trainer) -> SampleConfig:
    return SampleConfig(max_new_tokens=t.cfg.sample_length, seed=t.cfg.seed)


# --- finish -------------------------------------------------------------------------------------

def finish(t: Trainer, log=print) -> Path:
    """Rank 0, after the loop: the final evaluation on the whole validation split, samples, the HF
    model, the plot and the model card."""
    model, writer, weights_step = _final_model(t, log)
    after = t.evaluator.loss(model)
    t.run.log({"step": t.step, "val_loss": after, "val_ppl": _ppl(after), "final": True})
    samples = [s.text for s in writer.samples([_sample_prompt(t)], replace(_sampling(t), num_samples=3))]
    checkpoint.publish_model(t.run.path, model, t.tokenizer)
    ended = t.best.reason(t.total)
    if t.best.exhausted:
        log(ended)
    results = {"validation loss": f"{after:.4f}", "validation perplexity": f"{_ppl(after):.2f}",
               "validation perplexity before training": f"{_ppl(t.before):.2f}",
               "weights from": _weights_from(t, weights_step),
               "training ended": ended}
    if t.cfg.eval_at_end:
        from .evaluation import end_of_training

        results.update(end_of_training(writer, t.cfg, log))
    _write_info(t, results={"val_loss": after, "val_ppl": _ppl(after), "val_loss_before": t.before,
                            "val_ppl_before": _ppl(t.before), "weights_step": weights_step, "ended": ended})
    t.run.plot_loss()
    t.run.write_card(t.settings, t.store.stats, results, samples)
    log(f"validation perplexity: {_ppl(t.before):.2f} before, {_ppl(after):.2f} after training")
    log(f"model saved to {t.run.path}")
    return t.run.path


def _weights_from(t: Trainer, step: int) -> str:
    best = " (the best validation loss of the periodic evaluations)" if t.cfg.keeps_best and t.best.step else ""
    return f"step {step}" + (best or " (the last)")


def _final_model(t: Trainer, log) -> tuple[torch.nn.Module, Writer, int]:
    """The model to publish, its writer and the step of its weights: with --keep-best the best evaluated
    weights; under FSDP the last ones, reloaded (rank 0 cannot run a sharded model alone); else the last."""
    source, step = (t.last_saved, t.step) if t.sharded else (None, t.step)
    if t.cfg.keeps_best and t.best.step is None:
        log("warning: no periodic evaluation gave a finite validation loss; publishing the last weights")
    elif t.cfg.keeps_best:
        source, step = checkpoint.best_dir(t.run.path), t.best.step
        log(f"publishing the best weights: step {step}, validation loss {t.best.loss:.4f}")
    if source is None:
        return t.model, t.writer, step
    model = build_model(t.cfg, t.tokenizer, t.device, source).to(t.device)
    return model, Writer(model, t.tokenizer, autocast=t.writer.autocast, log=log), step


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50)) if math.isfinite(loss) else float("nan")
