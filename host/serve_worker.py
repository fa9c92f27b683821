"""One device, one sequence at a time: the thread that owns the backend, and the bounded queue before it.

The engine holds one KV cache, so requests cannot interleave: each runs to its end (or its client's
disconnect) before the next starts. A request that finds the queue full is refused at once (the
server answers 503 with Retry-After) instead of waiting unboundedly. Generation is host/generate.py's
loop, the one `gpt-fpga generate` runs; the worker only adds the text, cancellation and recovery.

The worker thread talks to the event loop through each job's asyncio queue
(loop.call_soon_threadsafe), so the HTTP layer never blocks on the device.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from gpt_fpga.contract.errors import GptFpgaError
from gpt_fpga.host.backends import Backend
from gpt_fpga.host.completion_text import CompletionText
from gpt_fpga.host.generate import generate
from gpt_fpga.host.serve_api import CompletionRequest

log = logging.getLogger("gpt_fpga.serve")


@dataclass
class TokenEvent:
    text: str  # the completion's new text (may be "" while a character or a stop sequence is incomplete)
    engine: list[dict] | None = None  # rtl/pynq: each command's cycles (and µs) for this token


@dataclass
class DoneEvent:
    text: str  # text held back until the end
    finish_reason: str  # "stop" (stop sequence or EOS) or "length" (max_tokens)
    completion_tokens: int


@dataclass
class ErrorEvent:
    message: str  # the driver's one-line message


CLIENT_GONE = "the client disconnected: generation stopped"


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the device is busy and {waiting} request(s) are already waiting; retry in "
                         f"{retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The client went away: stop at the next token."""


class _StopSequence(Exception):
    """A stop sequence ended the text: no need to decode further."""


@dataclass
class Job:
    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event):  # from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self):
        self.cancelled.set()


def engine_clock_hz(backend: Backend) -> float | None:
    """The engine's clock: the RTL simulation's (simulated) clock, or FCLK0 on the board."""
    device = getattr(backend, "device", None)
    if getattr(device, "clock_hz", None):
        return float(device.clock_hz)
    mhz = getattr(device, "fclk0_mhz", None)
    return mhz * 1e6 if mhz else None


def engine_stats(backend: Backend, clock_hz: float | None) -> list[dict] | None:
    """The cycle counters of each command of the last token, read by the driver (rtl/pynq only)."""
    stats = getattr(getattr(backend, "model", None), "last_stats", None)
    if stats is None:
        return None
    return [{"command": s["command"], "cycles": s["cycles"],
             "us": round(s["cycles"] / clock_hz * 1e6, 3) if clock_hz else None} for s in stats]


def one_line(e: BaseException) -> str:
    """The error's message on one line: the project's own errors as they are, others with their type."""
    text = " ".join(str(e).split())
    return text if isinstance(e, GptFpgaError) and text else f"{type(e).__name__}: {text}"


def run_completion(backend: Backend, job: Job, clock_hz: float | None = None):
    """Generate one completion, emitting a TokenEvent per token and a DoneEvent at the end."""
    req = job.request
    text = CompletionText(backend.codec, req.prompt_ids, req.stop, backend.config.eos_token_id)
    count = 0

    def on_token(token: int):
        nonlocal count
        if job.cancelled.is_set():
            raise Cancelled()
        count += 1
        job.emit(TokenEvent(text.push(token), engine_stats(backend, clock_hz)))
        if text.stopped:
            raise _StopSequence()

    try:
        generate(backend, req.prompt_ids, req.max_tokens, req.sampling, on_token)
    except _StopSequence:
        pass
    job.emit(DoneEvent(text.finish(), "stop" if text.stopped else "length", count))


class DeviceWorker:
    """The one thread that touches the backend; `max_waiting` requests may wait behind the running one."""

    def __init__(self, backend: Backend, max_waiting: int):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.backend, self.max_waiting = backend, max_waiting
        self.clock_hz = engine_clock_hz(backend)
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not finished: the running one and those waiting
        self.running: Job | None = None
        self.served = 0
        self.mean_seconds = 1.0  # of recent requests: the Retry-After estimate
        self._thread = threading.Thread(target=self._serve, name="gpt-fpga-device", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout_s: float = 10.0):
        if self.running is not None:
            self.running.cancel()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    @property
    def waiting(self) -> int:
        return self.pending - (self.running is not None)

    def submit(self, job: Job):
        with self._lock:
            if self.pending > self.max_waiting:
                raise QueueFull(self.waiting, self.retry_after())
            self.pending += 1
        self._jobs.put(job)

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the time requests took lately."""
        return max(1, math.ceil(self.mean_seconds * (self.waiting + 1)))

    def _serve(self):
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.running = job
            try:
                if job.cancelled.is_set():  # its client left while it waited
                    job.emit(ErrorEvent(CLIENT_GONE))
                else:
                    self._run(job)
            finally:
                with self._lock:
                    self.running = None
                    self.pending -= 1

    def _run(self, job: Job):
        start = time.monotonic()
        try:
            run_completion(self.backend, job, self.clock_hz)
        except Cancelled:
            log.info("client disconnected: generation stopped")
            job.emit(ErrorEvent(CLIENT_GONE))  # ends the request's wait; nobody reads the answer
        except Exception as e:  # noqa: BLE001 - a device error answers 500; the next request is served
            log.error("generation failed: %s", one_line(e))
            self._recover()  # first: once the client has its 500, the device is ready for the next request
            job.emit(ErrorEvent(one_line(e)))
        self.served += 1
        self.mean_seconds = 0.7 * self.mean_seconds + 0.3 * (time.monotonic() - start)

    def _recover(self):
        try:
            self.backend.recover()
        except Exception as e:  # noqa: BLE001 - logged; the next request reports the device's state
            log.error("the device did not recover: %s", one_line(e))
