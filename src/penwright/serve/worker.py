"""One worker thread per model: a Writer is not thread-safe, so requests wait their turn here.

Queued plain (non-streaming) requests that ask for exactly the same settings, with no seed, are
written together in one batch. A stream runs on its own and stops as soon as its client leaves.
Results travel back to the event loop through each job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import threading
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

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.cfg.num_samples


class Worker:
    def __init__(self, name: str, writer: Writer, batch_size: int):
        self.writer, self.batch_size = writer, batch_size
        self.jobs: deque[Job] = deque()
        self.ready = threading.Condition()
        self.closed = False
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

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=5)

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                if batch[0].stream:
                    self._stream(batch[0])
                else:
                    self._write(batch)
            except Exception as e:  # noqa: BLE001 (every waiting client must hear about it)
                for job in batch:
                    job.send("error", e)

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job, plus younger plain jobs with the same settings while they fit."""
        with self.ready:
            while True:
                while not self.jobs and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return None
                first = self.jobs.popleft()
                if not first.cancelled:
                    break
            batch = [first]
            if first.stream or first.cfg.seed is not None:  # a seed promises the same text on its own
                return batch
            rows = first.rows
            for job in list(self.jobs):
                if not job.stream and job.cfg == first.cfg and rows + job.rows <= self.batch_size:
                    self.jobs.remove(job)
                    if not job.cancelled:
                        batch.append(job)
                        rows += job.rows
            return batch

    def _write(self, batch: list[Job]) -> None:
        samples = self.writer.samples([p for job in batch for p in job.prompts], batch[0].cfg)
        for job in batch:
            job.send("samples", samples[:job.rows])
            samples = samples[job.rows:]

    def _stream(self, job: Job) -> None:
        """Each prompt's samples one after another; sample k of a seeded request uses seed + k."""
        n = job.cfg.num_samples
        for index, prompt in enumerate(p for p in job.prompts for _ in range(n)):
            seed = None if job.cfg.seed is None else job.cfg.seed + index % n
            pieces = self.writer.stream(prompt, replace(job.cfg, seed=seed, num_samples=1))
            try:
                while not job.cancelled:
                    job.send("text", index, next(pieces))
            except StopIteration as end:  # the stream returns its finished Sample
                job.send("end", index, end.value)
            finally:
                pieces.close()  # stops the decode loop when the client has gone
            if job.cancelled:
                return
        job.send("done")
