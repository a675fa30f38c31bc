"""Watching a run as it trains (`--log tensorboard`): the records of metrics.jsonl, mirrored as
TensorBoard event files in the run dir, so `tensorboard --logdir runs/` shows every run, offline
and without an account. metrics.jsonl stays the source of truth; this only copies it.
"""

from __future__ import annotations

from pathlib import Path

# metrics.jsonl key -> TensorBoard tag; the final evaluation (on the whole split) apart from the periodic ones
SCALARS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
           "val_loss": "validation/loss", "val_ppl": "validation/perplexity"}
FINAL = {"val_loss": "final/validation_loss", "val_ppl": "final/validation_perplexity"}
SAMPLES = "samples"


class TensorBoard:
    """Event files in `folder` (torch.utils.tensorboard's writer). On a resumed run, `purge_step` makes
    TensorBoard drop what an earlier attempt logged from that step on, as metrics.jsonl did."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def record(self, record: dict) -> None:
        step = record.get("step", 0)
        tags = FINAL if record.get("final") else SCALARS
        for key, tag in tags.items():
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(tag, record[key], step)
        if isinstance(record.get("sample"), str):
            self.writer.add_text(SAMPLES, record["sample"], step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


def open_viewer(name: str, folder: Path, purge_step: int | None = None):
    """The viewer `--log NAME` asks for (config.LOG_BACKENDS lists the names)."""
    if name == "tensorboard":
        return TensorBoard(folder, purge_step)
    raise ValueError(name)  # config refuses unknown names before a run starts
