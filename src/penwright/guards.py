"""What stops a training run safely: a signal (finish the step, save, say how to resume; writing in the
terminal uses the same flag to stop after a token), steps
whose loss or gradient is not finite (skipped, up to a limit), running out of memory (advice
instead of a traceback), and a validation loss that stopped getting better (`EarlyStop`).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import PenwrightError
from .words import plural


class StopFlag:
    """SIGINT/SIGTERM (or the `signals` given) ask a loop to stop where it can: training finishes its
    step, saves and exits; writing ends after its current token. A flag, not an exception raised
    wherever the signal lands, so that nothing is left half-updated (the engine's KV cache slots)."""

    def __init__(self, *signals: signal.Signals):
        self.signals = signals or (signal.SIGINT, signal.SIGTERM)
        self.raised = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
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
                f"training stopped at step {step}: {plural(skipped, 'step')} had a non-finite loss or gradient "
                f"(the first at step {int(self.first)}), more than --max-bad-steps {self.limit}; {kept}. "
                "Try a lower --lr or --precision fp32, or look for broken text in the corpus")


class EarlyStop:
    """The best periodic validation loss so far, its step, and the evaluations since it last improved;
    `exhausted` once `patience` of them (--early-stop) went by without a better one."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.loss, self.step = float("inf"), None
        self.since = 0
        self.evaluated = None  # the step of the latest evaluation

    def update(self, step: int, loss: float) -> bool:
        """Count the evaluation at `step`; True when it is the best so far."""
        self.evaluated = step
        if loss < self.loss:  # a NaN never is
            self.loss, self.step, self.since = loss, step, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    @classmethod
    def replay(cls, patience: int | None, records: list[dict], upto: int) -> "EarlyStop":
        """The state after the periodic evaluations in metrics.jsonl up to step `upto` (a resumed run's)."""
        stop = cls(patience)
        for r in records:
            if "val_loss" in r and 0 < r["step"] <= upto and not r.get("final"):
                stop.update(r["step"], r["val_loss"])
        return stop

    def reason(self, total: int) -> str:
        """Why training ended, for the model card."""
        if self.exhausted:
            return (f"early stopping at step {self.evaluated}: {self.since} evaluations in a row without a better "
                    f"validation loss than step {self.step}'s (--early-stop {self.patience})")
        return f"ran the planned {total} steps"


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
                             f"use a smaller batch with more accumulation ({smaller}); "
                             "continue with --resume") from None
