"""Continuous batching on penwright's engine: one decode loop per model over a batch of rows.

A request becomes rows (its prompts x n). A row waits until one of the cache's `--max-batch` slots
is free, is prefilled into it a chunk at a time (`--prefill-chunk` prompt tokens per step in all,
beside the running rows' decode steps, so a long prompt does not stall the streams), samples its
first token from the prefill's logits and joins the next decode step. It leaves at EOS, a stop
string or its length, or when its client leaves or runs out of time; its slot goes to the next row.
Where the model has int8 activations (`quantize.int8_activations`) a step is one pass for the
decoding rows and the prompt chunks together (`Cache.feed`); elsewhere each chunk has its own.

Every row samples with its own settings and its own random generator (seeded: the request's seed
plus the row's sample number), through the same `pick_tokens` as `penwright generate`, on its own
logits, which on CPU with int8 are bit-identical to the row's logits alone (`engine.each_row` and
`engine.packed` attend over each row's own keys; int8's products treat rows apart): a seeded
request writes the same text alone or beside others. n samples of one prompt prefill it once.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ..config import SampleConfig
from ..engine import Cache
from ..generate import Draft, Sample, Writer, pick_tokens
from ..quantize import has_int8_activations
from .worker import Job, Worker


@dataclass
class Group:
    """A request's rows: their samples as they finish, and how many are still writing."""

    job: Job
    samples: list[Sample | None]
    left: int
    first_token: bool = False


@dataclass
class Row:
    group: Group
    index: int  # the choice's index in the reply
    ids: list[int]  # what is prefilled: EOS, the label's token, the prompt
    cfg: SampleConfig  # its own settings; max_new_tokens what its slot has room for
    draft: Draft
    generator: torch.Generator
    seen: torch.Tensor  # (1, ids so far), read by the repetition penalty
    new: list[int] = field(default_factory=list)  # tokens written, EOS included
    slot: int | None = None
    prefill: Iterator | None = None  # its chunks' passes, where steps are not packed
    todo: int = 0  # prompt tokens not prefilled yet
    last: int | None = None  # the token the next decode step feeds
    copies: list[Row] = field(default_factory=list)  # rows of the same prompt admitted with it: they fork its slot

    @property
    def job(self) -> Job:
        return self.group.job


class Batcher(Worker):
    def __init__(self, name: str, writer: Writer, max_batch: int, prefill_chunk: int, length: int):
        self.cache = Cache(writer.model, max_batch, length)  # `length` tokens a slot: the longest row a request makes
        self.chunk = prefill_chunk
        self.next: deque[Row] = deque()  # rows of the request taken from the queue, waiting for a slot
        self.rows: list[Row] = []  # rows holding a slot: prefilling, then decoding
        self.first_tokens: deque[float] = deque(maxlen=200)  # seconds from submission to a request's first token
        # Decode rows and prompt chunks share one pass where no row's numbers depend on its company
        # (int8 activations: exact sums); elsewhere each prompt chunk has a pass of its own.
        self.packs = has_int8_activations(writer.model)
        super().__init__(name, writer, max_batch)

    @property
    def queued(self) -> int:
        return len(self.jobs) + bool(self.next)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.next)

    @property
    def streaming(self) -> int:
        return len({id(row.job) for row in self.rows if row.job.stream})

    def health(self) -> dict:
        """What is under way, and the median time to first token of recent requests."""
        first = round(statistics.median(self.first_tokens), 4) if self.first_tokens else None
        return {**super().health(), "rows": len(self.rows), "max_batch": self.max_batch, "first_token_s": first}

    # --- the worker thread ----------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        self.writer.model.eval()
        while self._wait_for_work():
            try:
                self._leave_cancelled()
                self._admit()
                if self.packs:
                    self._step()
                else:
                    self._decode()
                    self._prefill()
            except Exception as e:  # noqa: BLE001 (every client under way must hear about it; the loop goes on)
                for group in {id(row.group): row.group for row in [*self.rows, *self.next]}.values():
                    group.job.send("error", e)
                    group.job.cancelled = True
                self._leave_cancelled()

    def _leave_cancelled(self) -> None:
        """Rows whose client left or ran out of time give their slots back."""
        self.next = deque(row for row in self.next if not row.job.cancelled)
        for row in [row for row in self.rows if row.job.cancelled]:
            self._leave(row)

    def _admit(self) -> None:
        """Give free slots to waiting rows, oldest request first, and start their prefills."""
        while self.cache.idle:
            if not self.next:
                with self.ready:
                    job = self.jobs.popleft() if self.jobs else None
                if job is None:
                    return
                if not job.cancelled:
                    self.next.extend(self._rows_of(job))
                continue
            row = self.next.popleft()
            row.slot = self.cache.reserve()
            self.rows.append(row)
            source = next((r for r in self.rows if r.todo and r.group is row.group and r.ids == row.ids), None)
            if source is not None:  # n samples of one prompt: it is prefilled once
                source.copies.append(row)
            else:
                row.todo = len(row.ids)
                row.prefill = None if self.packs else self.cache.prefill(row.slot, row.ids, self.chunk)

    def _rows_of(self, job: Job) -> list[Row]:
        n, seed = job.cfg.num_samples, job.cfg.seed
        group = Group(job, [None] * job.rows, job.rows)
        rows = []
        try:
            for index, prompt in enumerate(p for p in job.prompts for _ in range(n)):
                ids, budget = self.writer.prompt_ids(prompt, job.cfg)
                cfg = replace(job.cfg, num_samples=1, max_new_tokens=budget)
                rows.append(Row(group, index, ids, cfg, Draft(self.writer.tokenizer, prompt, job.cfg),
                                self.writer.generator(None if seed is None else seed + index % n),
                                torch.tensor([ids], device=self.writer.device)))
        except Exception as e:  # noqa: BLE001 (a request the writer refuses fails alone)
            job.send("error", e)
            return []
        return rows

    def _chunks(self) -> list[tuple[Row, list[int]]]:
        """This step's prompt chunks, oldest row first, up to `chunk` tokens in all (at least one chunk)."""
        spent, chunks = 0, []
        for row in [row for row in self.rows if row.todo]:
            size = min(self.chunk, row.todo)
            if spent and spent + size > self.chunk:
                break
            start = len(row.ids) - row.todo
            chunks.append((row, row.ids[start:start + size]))
            spent, row.todo = spent + size, row.todo - size
        return chunks

    def _step(self) -> None:
        """One pass (`Cache.feed`) for every decoding row's next token and this step's prompt chunks."""
        decoding, chunks = [row for row in self.rows if row.last is not None], self._chunks()
        segments = [(row.slot, [row.last]) for row in decoding] + [(row.slot, ids) for row, ids in chunks]
        if not segments:
            return
        logits = self.cache.feed(segments, [True] * len(decoding) + [not row.todo for row, _ in chunks])
        self._take(decoding, logits[:len(decoding)])
        for row, scores in zip([row for row, _ in chunks if not row.todo], logits[len(decoding):]):
            self._first(row, scores)

    def _prefill(self) -> None:
        """Feed this step's prompt chunks, a pass each."""
        for row, _ in self._chunks():
            logits = next(row.prefill)
            if logits is not None:  # the last chunk
                row.prefill = None
                self._first(row, logits)

    def _first(self, row: Row, logits: torch.Tensor) -> None:
        """A row whose prompt is in (and its copies, which fork its slot) samples its first token."""
        for copy in row.copies:
            self.cache.fork(row.slot, copy.slot)
        self._take([row, *row.copies], logits[None].expand(1 + len(row.copies), -1))

    def _decode(self) -> None:
        rows = [row for row in self.rows if row.last is not None]
        if rows:
            ids = torch.tensor([row.last for row in rows], device=self.writer.device)
            self._take(rows, self.cache.decode([row.slot for row in rows], ids))

    def _take(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row samples its next token from its logits, with its own settings and generator."""
        for row, scores in zip(rows, logits):
            token = int(pick_tokens(scores[None], row.cfg, row.generator, row.seen)[0])
            row.new.append(token)
            if row.cfg.repetition_penalty != 1.0:
                row.seen = torch.cat([row.seen, row.seen.new_tensor([[token]])], dim=1)
            end = token in self.writer.stops
            piece, stopped = row.draft.add(None if end else token)  # the draft sees stop strings too
            over = end or stopped or len(row.new) >= row.cfg.max_new_tokens
            if piece and row.job.stream:
                row.job.send("text", row.index, piece)
            if not row.group.first_token:
                row.group.first_token = True
                self.first_tokens.append(time.monotonic() - row.job.created)
            row.last = token
            if over:
                self._finish(row)

    def _finish(self, row: Row) -> None:
        self._leave(row)  # before its client hears the end: a finished request holds no slot
        piece, sample = row.draft.close()
        group, job = row.group, row.job
        if job.stream:
            if piece:
                job.send("text", row.index, piece)
            job.send("end", row.index, sample)
        group.samples[row.index], group.left = sample, group.left - 1
        if not group.left:
            job.send(*(("done",) if job.stream else ("samples", group.samples)))
            self.finished(job)

    def _leave(self, row: Row) -> None:
        self.rows.remove(row)
        self.cache.free(row.slot)
