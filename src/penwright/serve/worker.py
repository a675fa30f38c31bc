"""One worker thread per model: a Writer is not thread-safe, so requests wait their turn here.

`Worker` holds what every model's worker shares: the bounded wait queue the event loop submits to,
the thread, and the times that answer "how long until there is room" (`retry_after`). Models on
penwright's engine get `Batcher` (batcher.py: continuous batching). Models on transformers' engine
get `TurnWorker`: queued plain (non-streaming) requests that ask for exactly the same settings, with
no seed, are written together in one batch, and streams take turns, one piece each, so every client
sees its text flow; a stream stops as soon as its client leaves. Results travel back to the event
loop through each job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from ..config import SampleConfig
from ..generate import Writer


@dataclass
class Job:
    """One request. Events sent back: ("text", index, piece), ("end", index, Sample),
    ("samples", [Sample]) for plain requests, ("error", exception), and ("done",) after a stream."""

    prompts: list[str | None]
    cfg: SampleConfig
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop: the client left or ran out of time
    created: float = field(default_factory=time.monotonic)

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.cfg.num_samples


class Flow:
    """A stream under way: its samples one after another, a piece per step."""

    def __init__(self, writer: Writer, job: Job):
        n = job.cfg.num_samples
        self.writer, self.job = writer, job
        self.todo = enumerate(p for p in job.prompts for _ in range(n))
        self.index, self.pieces = 0, None

    def step(self, worker: Worker) -> bool:
        """Send the next piece; True once the stream is over (written, failed or abandoned)."""
        job = self.job
        try:
            if job.cancelled:
                return self.close()
            if self.pieces is None:
                self.index, prompt = next(self.todo, (None, None))
                if self.index is None:
                    job.send("done")
                    worker.finished(job)
                    return True
                n, seed = job.cfg.num_samples, job.cfg.seed  # sample k of a seeded request uses seed + k
                cfg = replace(job.cfg, num_samples=1, seed=None if seed is None else seed + self.index % n)
                self.pieces = self.writer.stream(prompt, cfg)
            job.send("text", self.index, next(self.pieces))
        except StopIteration as end:  # the sample is written; its stream returns the Sample
            job.send("end", self.index, end.value)
            self.pieces = None
        except Exception as e:  # noqa: BLE001 (the client must hear about it)
            job.send("error", e)
            return self.close()
        return False

    def close(self) -> bool:
        if self.pieces is not None:
            self.pieces.close()  # ends the decode loop
        return True


class Worker:
    """The queue and thread of one model's worker; subclasses write (`_run`) and say what is under way (`busy`)."""

    def __init__(self, name: str, writer: Writer, max_batch: int):
        self.writer, self.max_batch = writer, max_batch
        self.jobs: deque[Job] = deque()
        self.ready = threading.Condition()
        self.closed = False
        self.durations: deque[float] = deque(maxlen=100)  # seconds from submission to the last word, lately
        self.thread = threading.Thread(target=self._run, name=f"penwright-serve-{name}", daemon=True)
        self.thread.start()

    def submit(self, prompts: list[str | None], cfg: SampleConfig, stream: bool) -> Job:
        """Queue a request; call from the event loop, then read `job.events`."""
        job = Job(prompts, cfg, stream, asyncio.get_running_loop())
        with self.ready:
            self.jobs.append(job)
            self.ready.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self.jobs)

    @property
    def busy(self) -> bool:
        return False

    @property
    def streaming(self) -> int:
        return 0

    def health(self) -> dict:
        return {"queued": self.queued, "streaming": self.streaming}

    def retry_after(self) -> int:
        """Seconds until a full queue has likely made room: the queue's waves of requests at the recent pace."""
        typical = statistics.median(self.durations) if self.durations else 1.0
        return max(1, min(60, math.ceil(typical * self.queued / self.max_batch)))

    def finished(self, job: Job) -> None:
        self.durations.append(time.monotonic() - job.created)

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait_for_work(self) -> bool:
        with self.ready:
            while not (self.jobs or self.busy or self.closed):
                self.ready.wait()
            return not self.closed


class TurnWorker(Worker):
    """For transformers' engine: alike plain requests in a batch, streams in turns."""

    def __init__(self, name: str, writer: Writer, max_batch: int):
        self.flows: list[Flow] = []  # streams under way, at most max_batch
        super().__init__(name, writer, max_batch)

    @property
    def busy(self) -> bool:
        return bool(self.flows)

    @property
    def streaming(self) -> int:
        return len(self.flows)

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while self._wait_for_work():
            rounds = 1  # pieces per stream before the next batch; after a batch, as many as it wrote tokens,
            if batch := self._next_batch():  # so that plain requests cannot starve the streams
                rounds = batch[0].cfg.max_new_tokens
                try:
                    self._write(batch)
                except Exception as e:  # noqa: BLE001 (every waiting client must hear about it)
                    for job in batch:
                        job.send("error", e)
            for _ in range(rounds):
                self.flows = [flow for flow in self.flows if not flow.step(self)]

    def _next_batch(self) -> list[Job]:
        """Start the streams at the head of the queue while there is room; then, if a plain job is
        next, return it with younger plain jobs of the same settings while they fit in a batch."""
        with self.ready:
            while self.jobs and (self.jobs[0].cancelled or self.jobs[0].stream and len(self.flows) < self.max_batch):
                job = self.jobs.popleft()
                if not job.cancelled:
                    self.flows.append(Flow(self.writer, job))
            if not self.jobs or self.jobs[0].stream:
                return []
            first = self.jobs.popleft()
            batch = [first]
            if first.cfg.seed is not None:  # a seed promises the same text as on its own
                return batch
            rows = first.rows
            for job in list(self.jobs):
                if not job.stream and job.cfg == first.cfg and rows + job.rows <= self.max_batch:
                    self.jobs.remove(job)
                    if not job.cancelled:
                        batch.append(job)
                        rows += job.rows
            return batch

    def _write(self, batch: list[Job]) -> None:
        samples = self.writer.samples([p for job in batch for p in job.prompts], batch[0].cfg,
                                      abandoned=lambda: all(job.cancelled for job in batch))
        for job in batch:
            job.send("samples", samples[:job.rows])
            self.finished(job)
            samples = samples[job.rows:]
