"""Knowing when to stop: --early-stop ends a run whose validation loss stopped improving, and
--keep-best publishes the best evaluated weights, not the last."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import sample_rows, tiny_config
from penwright import PenwrightError, TrainConfig, checkpoint, train

quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Twelve synopses: a tiny model learns them by heart within a few dozen steps."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text("\n\n".join(r["synopsis"] for r in sample_rows()[:12]) + "\n")
    return path


def periodic(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["step"] > 0 and not r.get("final")]


def test_early_stopping_ends_an_overfitting_run_with_the_best_weights(tmp_path, tiny_corpus):
    cfg = tiny_config(tiny_corpus, tmp_path / "run", vocab_size=300, block_size=32, batch_size=4, lr=5e-3,
                      warmup_steps=0, dropout=0.0, max_steps=300, eval_every=4, eval_batches=4, log_every=4,
                      early_stop=2)
    run = train(cfg, **quiet)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = periodic(records)
    best_step, best = min(evaluations, key=lambda e: e[1])
    last_step = evaluations[-1][0]
    assert last_step < 300, "stopped before --max-steps"
    after = [loss for step, loss in evaluations if step > best_step]
    assert len(after) == 2 and all(loss >= best for loss in after), evaluations  # --early-stop 2
    trained = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert trained[last_step] < trained[best_step], "the training loss still fell: it was overfitting"

    best_dir = checkpoint.best_dir(run)
    published, kept = load_file(run / "model.safetensors"), load_file(best_dir / "model.safetensors")
    assert published.keys() == kept.keys() and all(torch.equal(published[k], kept[k]) for k in kept)
    last = load_file(checkpoint.checkpoint_dir(run) / f"step-{last_step:08d}" / "model.safetensors")
    assert not all(torch.equal(last[k], kept[k]) for k in kept), "the last weights are not the ones published"
    assert checkpoint.load_state(best_dir)["step"] == best_step and checkpoint.verify(best_dir)

    info = json.loads((run / "penwright.json").read_text())["results"]
    assert info["weights_step"] == best_step and info["ended"].startswith(f"early stopping at step {last_step}")
    card = (run / "README.md").read_text()
    assert f"| weights from | step {best_step} (the best validation loss" in card
    assert f"| training ended | early stopping at step {last_step}: 2 evaluations in a row" in card


def test_without_keep_best_the_card_says_the_run_ended_as_planned(tiny_run):
    card = (tiny_run / "README.md").read_text()
    assert "| weights from | step 60 (the last) |" in card and "| training ended | ran the planned 60 steps |" in card
    assert not checkpoint.best_dir(tiny_run).exists()


@pytest.mark.parametrize("flag", [dict(early_stop=3), dict(keep_best=True)])
def test_stopping_on_evaluations_needs_evaluations(flag):
    with pytest.raises(PenwrightError, match="compares periodic evaluations, and --eval-every is 0: give --eval-every"):
        TrainConfig(data="x.txt", out="runs/x", eval_every=0, **flag)
