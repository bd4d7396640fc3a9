"""One generation at a time: a worker thread that loads the engine, then runs jobs from a bounded FIFO
queue. A job is cancelled at the next pass boundary: the engine calls the job's streamer after every
pass, and the streamer raises :class:`Cancelled` there, which unwinds ``generate`` cleanly. An engine
that can no longer generate (its weight files changed on disk, it was closed) fails the worker: it takes
no more jobs, and /health says why."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from llmcad.errors import EngineClosedError, PromptError, WeightFileError
from llmcad.progress import FirstPassLog
from llmcad.serve import errors
from llmcad.serve.prompts import Frontend
from llmcad.serve.schemas import Params
from llmcad.serve.textstream import TextStream

log = logging.getLogger("llmcad.serve")
FIRST_PASS_LOG_EVERY_S = 2.0  # at most this long without a log line in a reply's first pass
LOADING_LOG_EVERY_S = 2.0  # and while the models load


class Cancelled(Exception):
    """Raised from a job's streamer, inside ``engine.generate``, to end a cancelled generation."""


@dataclass
class Outcome:
    """A finished generation: the text the client gets and the numbers for ``usage``."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    stats: dict
    cached_tokens: int = 0  # prompt tokens whose KV came from the engine's prefix cache


@dataclass
class Job:
    """One request's generation. ``prompt``: what ``engine.generate`` is given (token ids, or chat
    messages), ``prompt_tokens`` its length in tokens. Events reach the request's event loop as
    (kind, value): ("start", None), ("text", delta), then ("done", Outcome) or ("error", APIError)."""

    prompt: list
    prompt_tokens: int
    max_new_tokens: int
    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_error: errors.APIError | None = None

    def post(self, kind: str, value=None) -> None:
        """Thread-safe; dropped if the loop has closed (nobody is listening any more)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            pass

    def cancel(self, error: errors.APIError | None = None) -> None:
        """Stop at the next pass boundary (or before starting); ``error`` is posted to the request, if any."""
        if not self.cancelled.is_set():
            self.cancel_error = error
            self.cancelled.set()


class JobQueue:
    """A FIFO of jobs for the worker: up to ``limit`` may wait while one runs (one more is taken when the
    worker is idle, since it leaves the queue at once). Cancelled jobs leave it at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # the worker holds a job

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise errors.shutting_down()
            if len(self._jobs) >= self.limit + (0 if self._busy else 1):
                raise errors.queue_full(self.limit)
            self._jobs.append(job)
            self._cond.notify()

    def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._jobs.remove(job)
                return True
            except ValueError:
                return False

    def get(self) -> Job | None:
        """The oldest job (the worker holds it until :meth:`done`); None once the queue is closed."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._busy = True
            return self._jobs.popleft()

    def done(self) -> None:
        with self._cond:
            self._busy = False

    def close(self) -> list:
        """Refuse new jobs and wake the worker; returns the jobs that were still waiting."""
        with self._cond:
            self._closed = True
            waiting, self._jobs = list(self._jobs), collections.deque()
            self._cond.notify_all()
            return waiting

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)


class GenerationWorker:
    """The thread that owns the engine. ``load_engine()`` runs on it first; ``state`` is "loading",
    "ready", "failed" (loading failed: ``load_error``; or the engine broke while serving; ``failure``
    says why in one line) or "stopped". ``on_load_error(exc)`` is called when loading fails."""

    FATAL = (EngineClosedError, WeightFileError)  # the engine cannot generate any more

    def __init__(self, load_engine, max_queue: int, on_load_error=None):
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue}: expected an int >= 0")
        self.queue = JobQueue(max_queue)
        self.state, self.load_error, self.engine = "loading", None, None
        self.failure: str | None = None
        self.counts = collections.Counter()  # finished, cancelled, failed
        self.running: Job | None = None
        self.frontend: Frontend | None = None  # what the event loop needs to check requests, once loaded
        self._load_engine, self.on_load_error = load_engine, on_load_error
        self._lock = threading.Lock()
        self._halted_while_loading = False
        self._thread = threading.Thread(target=self._main, name="llmcad-serve-worker", daemon=True)
        self.ready = threading.Event()  # set once loading has ended (either way)

    def start(self) -> "GenerationWorker":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self.state != "ready":
            raise self.refusal()
        self.queue.put(job)

    def refusal(self) -> errors.APIError:
        """The 503 a request gets when the worker is not ready."""
        if self.state == "stopped":
            return errors.shutting_down()
        if self.state == "failed" and self.load_error is None and self.failure is not None:
            return errors.engine_failed(self.failure)
        return errors.not_ready(self.state)

    def withdraw(self, job: Job) -> None:
        """The request is gone: drop the job if it still waits, else stop it at the next pass boundary."""
        self.queue.remove(job)
        job.cancel()

    def halt(self) -> None:
        """Refuse new jobs, fail the waiting ones and cancel the running one; returns at once."""
        with self._lock:
            self._halted_while_loading = self._halted_while_loading or self.state == "loading"
            self.state = "failed" if self.state == "failed" else "stopped"
            for job in self.queue.close():
                job.post("error", errors.shutting_down())
            if self.running is not None:
                self.running.cancel(errors.shutting_down())

    def stop(self, timeout: float | None = None) -> None:
        """:meth:`halt`, then wait for the thread to close the engine. A thread still loading the models is
        left to end with the process (it is a daemon): loading cannot be interrupted."""
        self.halt()
        if not self._halted_while_loading and self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ on the worker thread
    def _log_while_loading(self) -> None:
        """A log line every LOADING_LOG_EVERY_S while the models load (ends when loading ends)."""
        started = time.perf_counter()
        while not self.ready.wait(LOADING_LOG_EVERY_S):
            log.info("loading the models: %.0f s", time.perf_counter() - started)

    def _main(self) -> None:
        ticker = threading.Thread(target=self._log_while_loading, name="llmcad-serve-loading", daemon=True)
        ticker.start()
        try:
            engine = self._load_engine()
            try:
                frontend = Frontend.of(engine)
            except BaseException:
                engine.close()
                raise
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits
            self.load_error, self.failure = exc, _one_line(exc)
            with self._lock:
                self.state = "failed" if self.state == "loading" else self.state
            self.ready.set()
            ticker.join()  # a tick already past its wait logs before the outcome does
            log.error("could not load the models: %s", self.failure)
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        self.engine, self.frontend = engine, frontend
        with self._lock:
            stopped = self.state == "stopped"
            self.state = "stopped" if stopped else "ready"
        self.ready.set()
        ticker.join()
        log.info("models loaded: ready")
        try:
            while not stopped and (job := self.queue.get()) is not None:
                with self._lock:
                    self.running = job
                try:
                    self._run(job)
                finally:
                    with self._lock:
                        self.running = None
                    self.queue.done()
        finally:
            engine.close()

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.post("error", job.cancel_error or errors.shutting_down())
            return
        job.post("start")
        self.counts["started"] += 1
        number, started = self.counts["started"], time.perf_counter()
        log.info("request %d: %d prompt tokens, up to %d new", number, job.prompt_tokens, job.max_new_tokens)
        text = TextStream(self.engine.tokenizer, job.params.stop)
        streamer = _JobStreamer(job, text, self._first_pass_log(number))
        try:
            result = self.engine.generate(job.prompt, job.max_new_tokens, streamer=streamer,
                                          **job.params.engine_kwargs())
        except Cancelled:
            self.counts["cancelled"] += 1
            job.post("error", job.cancel_error or errors.shutting_down())
            return
        except self.FATAL as exc:
            self.counts["failed"] += 1
            job.post("error", self._fail(exc))
            return
        except (PromptError, ValueError) as exc:  # checked before queueing; kept as a 400 all the same
            self.counts["failed"] += 1
            job.post("error", errors.bad_request(" ".join(str(exc).split())))
            return
        except Exception as exc:  # noqa: BLE001 - the engine stays up; the request gets a 500
            self.counts["failed"] += 1
            log.exception("generation failed")
            job.post("error", errors.internal(exc))
            return
        finally:
            streamer.first_text()
        log.info("request %d: %d tokens in %.1f s (%s)", number, len(result.tokens), time.perf_counter() - started,
                 _pace(result.stats))
        tail = text.finish()
        if tail and job.params.stream:
            job.post("text", tail)
        self.counts["finished"] += 1
        job.post("done", _outcome(text, result, job.prompt_tokens))

    def _first_pass_log(self, number: int):
        """A log line every 2 s while a streamed target reads its layers before the first text."""
        streamed = getattr(self.engine, "streamed", None)
        if streamed is None or not streamed.placement.streamed_layers:
            return None
        return FirstPassLog(streamed, lambda read, layers: log.info(
            "request %d: reading the target: layer %d/%d", number, read, layers), every_s=FIRST_PASS_LOG_EVERY_S)

    def _fail(self, exc: BaseException) -> errors.APIError:
        """The engine is broken: refuse new jobs, fail the waiting ones; returns the jobs' error."""
        with self._lock:
            self.failure = _one_line(exc)
            self.state = "failed"
            error = errors.engine_failed(self.failure)
            for job in self.queue.close():
                job.post("error", error)
        log.error("the engine cannot generate any more: %s", self.failure)
        return error


class _JobStreamer:
    """The engine's streamer for one job (put()/end() protocol: the prompt ids first, then each pass's
    committed tokens): it sends text deltas and raises Cancelled once the job is cancelled."""

    def __init__(self, job: Job, text: TextStream, first_pass=None):
        self.job, self.text, self.prompt_seen = job, text, False
        self.first_pass = first_pass  # a FirstPassLog, closed by the first committed tokens

    def first_text(self) -> None:
        if self.first_pass is not None:
            self.first_pass.close()
            self.first_pass = None

    def put(self, token_ids) -> None:
        if self.job.cancelled.is_set():
            raise Cancelled()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.first_text()
        delta = self.text.push(token_ids.tolist())
        if delta and self.job.params.stream:
            self.job.post("text", delta)

    def end(self) -> None:
        pass


def _pace(stats: dict) -> str:
    """tok/s and tokens a pass for the log, from the engine's stats."""
    return f"{stats.get('tokens_per_s', 0.0):.2f} tok/s, {stats.get('tokens_per_pass', 0.0):.1f} tokens a pass"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _outcome(text: TextStream, result, prompt_tokens: int) -> Outcome:
    stop_reason = result.stats.get("stop_reason")
    finish = "stop" if stop_reason in ("eos", "stop") else "length"
    return Outcome(text.final(), finish, prompt_tokens, len(result.tokens), result.stats,
                   int(result.stats.get("cached_tokens", 0)))

