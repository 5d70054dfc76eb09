"""The batching engine: one worker thread owns the model; the requests waiting when it is free (up to max_batch)
are decoded together as one left-padded batch, each row with its own sampling, stop strings and token limit.

Requests arriving while a batch decodes join it at the next step when a row is free and they fit (prefilled alone
into that cache row, left-padded to the batch's position); the others wait in a bounded queue (`QueueFull` when it
is full: the server answers 503). A row that finishes or is cancelled (its client went away) leaves the batch at the
next step: its KV-cache row is dropped, the step gets cheaper and the row is free for a newcomer. Nothing here knows
HTTP; results go to each request's `emit` callback.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generate import Sampling, cache_length, decode_logits, sample

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue is at its bound: try again later (HTTP 503)."""


@dataclass
class Chunk:
    """What a request gets from the engine: new text, and at the end a finish reason and the token counts."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" (max_tokens), "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenRequest:
    """One completion. temperature 0 = greedy; seed None = a random seed. `emit` is called from the worker thread."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Chunk], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    strip_leading_space: bool = False  # a chat reply starts a text; a completion continues one
    id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_arrival: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0  # when its batch started (queue wait = t_start - t_arrival)
    t_end: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A request's decoding state: its sampler, incremental detokenizer and the text not yet sent (held back while
    it could still be the start of a stop string, as vLLM does)."""

    def __init__(self, req: GenRequest, tokenizer, eos_id: int, device):
        self.req, self.eos_id = req, eos_id
        self.decoder = tokenizer.stream(strip_leading_space=req.strip_leading_space)
        self.text, self.sent, self.n = "", 0, 0
        self.hold = max((len(s) for s in req.stop), default=1) - 1
        self.sampling = None
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else random.getrandbits(63)
            gen = torch.Generator(device=device).manual_seed(seed)
            self.sampling = Sampling(True, req.temperature, req.top_p, 0, gen)
        self.done = False

    def push(self, token: int) -> Chunk | None:
        """Take the row's next token; returns what to send (None: nothing yet) and marks the row done at the end."""
        self.n += 1
        finish = None
        if token == self.eos_id and not self.req.ignore_eos:
            self.text += self.decoder.flush()
            finish = "stop"
        else:
            self.text += self.decoder.push(token)
            if self.n >= self.req.max_tokens:
                self.text += self.decoder.flush()
                finish = "length"
        # a stop string ends the text where it starts (the stop string itself is not returned)
        cut = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.req.stop if s) if i >= 0]
        if cut:
            self.text, finish = self.text[: min(cut)], "stop"
        end = len(self.text) if finish else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        if finish:
            self.done = True
            return Chunk(delta, finish, len(self.req.prompt_ids), self.n)
        return Chunk(delta) if delta else None


class Engine:
    """Owns `model` in one worker thread; submit() GenRequests from any thread.

    max_batch: rows decoded together; max_queue: requests waiting beyond those (QueueFull past it); context: the
    longest prompt + max_tokens accepted (the KV cache is sized per batch, up to it); batch_wait: seconds the worker
    waits after the first arrival for others to join its batch.
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 batch_wait: float = 0.005):  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.max_batch, self.batch_wait = model, max_batch, batch_wait
        limit = model.config.max_position_embeddings
        self.context = min(context or limit, limit)
        self.eos_id = model.tokenizer.eos_id
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue + max_batch)
        self.steps = 0  # model forwards so far (prefills + decode steps): tests count them
        self.batches = 0
        self._busy = False
        self._held: GenRequest | None = None  # taken from the queue but did not fit the running batch
        self._members: list[GenRequest] = []  # every request of the running batch (to fail them if it fails)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixq-engine", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        """A batch is decoding or requests are waiting."""
        return self._busy or self._held is not None or not self.queue.empty()

    def submit(self, req: GenRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0 or req.max_tokens < 1 or n + req.max_tokens > self.context:
            raise ValueError(f"prompt {n} tokens + max_tokens {req.max_tokens} must fit the context of {self.context}")
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting; retry later") from None

    def _run(self) -> None:
        while not self._stop.is_set():
            first, self._held = self._held, None
            if first is None:
                try:
                    first = self.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
            self._busy = True
            batch = [first]
            deadline = time.perf_counter() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            self._members = [r for r in batch if not r.cancelled.is_set()]
            try:
                if self._members:
                    self._decode(list(self._members))
            except Exception as e:  # noqa: BLE001 - a failed batch must not kill the server: fail its requests
                log.exception("batch of %d failed", len(self._members))
                for r in self._members:
                    if not r.t_end:
                        _emit(r, Chunk("", "error", error=f"{type(e).__name__}: {e}"))
            finally:
                self._busy = False

    def _decode(self, reqs: list[GenRequest]) -> None:
        """Decode `reqs` as one batch; requests arriving meanwhile join it (see _admit) while it has room."""
        model, device = self.model, self.model.device
        B, S = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: each prompt ends at position S - 1
            ids[i, S - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, S - len(r.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        # few distinct cache lengths (powers of two), so the allocator reuses them from batch to batch
        L = cache_length(S + max(r.max_tokens for r in reqs), self.context)
        if (model.max_batch_size, model.max_seq_length) != (self.max_batch, L):
            model.setup_caches(self.max_batch, L)
        rows = [Row(r, model.tokenizer, self.eos_id, device) for r in reqs]
        log.debug("batch %d: %d rows, prompt length %d, cache length %d", self.batches, B, S, L)
        t0 = time.perf_counter()
        for r in reqs:
            r.t_start = t0
        self.batches += 1
        with torch.inference_mode():
            logits = model(ids, torch.arange(S, device=device), mask, last_only=True)[:, -1]  # [B, V]
            self.steps += 1
            cur = self._push(rows, self._sample(logits, rows))
            pos = S
            while True:
                keep = [i for i, row in enumerate(rows) if not row.done and not row.req.cancelled.is_set()]
                if not keep:
                    return
                if len(keep) < len(rows):  # drop the finished rows from the batch, their cache rows too
                    idx = torch.tensor(keep, device=device)
                    rows, cur, mask = [rows[i] for i in keep], cur[idx], mask[idx]
                    _keep_cache_rows(model, idx)
                rows, cur, mask = self._admit(rows, cur, mask, pos, L)
                logits = decode_logits(model, cur, torch.tensor([pos], device=device), mask)  # [B, V]
                self.steps += 1
                pos += 1
                cur = self._push(rows, self._sample(logits, rows))

    def _admit(self, rows: list[Row], cur: Tensor, mask: Tensor, pos: int, L: int):
        """Let waiting requests join the running batch (continuous batching) while it has free rows.

        A newcomer with n prompt tokens is prefilled alone into the next free cache row at positions pos-n..pos-1,
        left-padded by pos-n (so it needs n <= pos, and pos + max_tokens <= L); from the next step on it decodes
        with the others. Requests join in arrival order: the first that does not fit is held (and those behind it
        wait) until it fits, at a later step (a prompt longer than pos) or in the next batch.
        """
        model, device = self.model, self.model.device
        while len(rows) < self.max_batch:
            r, self._held = self._held, None
            if r is None:
                try:
                    r = self.queue.get_nowait()
                except queue.Empty:
                    break
            if r.cancelled.is_set():
                continue
            n = len(r.prompt_ids)
            if n > pos or pos + r.max_tokens > L:  # fits a few steps later, or only a new batch
                self._held = r
                break
            i = len(rows)
            row_mask = torch.zeros(1, pos, dtype=torch.long, device=device)
            row_mask[:, pos - n:] = 1
            ids = torch.tensor([r.prompt_ids], device=device)
            row = Row(r, model.tokenizer, self.eos_id, device)
            r.t_start = time.perf_counter()
            self._members.append(r)
            with _cache_row(model, i):
                logits = model(ids, torch.arange(pos - n, pos, device=device), row_mask, last_only=True)[:, -1]
            self.steps += 1
            tok = self._push([row], self._sample(logits, [row]))
            if row.done:
                continue
            # widen the batch's mask to pos columns (positions past the old width are real for the old rows)
            old = torch.ones(mask.shape[0], pos, dtype=mask.dtype, device=device)
            old[:, : mask.shape[1]] = mask
            rows, cur, mask = rows + [row], torch.cat([cur, tok]), torch.cat([old, row_mask])
            log.debug("request %s joined the batch at position %d (%d rows)", r.id, pos, len(rows))
        return rows, cur, mask

    @staticmethod
    def _push(rows: list[Row], cur: Tensor) -> Tensor:
        """Hand each row its new token and send what it completes; returns cur."""
        for row, t in zip(rows, cur.tolist()):
            chunk = row.push(t)
            if row.done:
                row.req.t_end = time.perf_counter()
            if chunk is not None:
                _emit(row.req, chunk)
        return cur

    @staticmethod
    def _sample(logits: Tensor, rows: list[Row]) -> Tensor:
        """Per-row sampling: greedy rows take the argmax, the others `sample` with their own seeded generator."""
        cur = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.sampling is not None:
                cur[i] = sample(logits[i : i + 1], row.sampling)[0]
        return cur


def _keep_cache_rows(model, idx: Tensor) -> None:
    """Move the KV-cache rows `idx` to the front of every layer's cache (the model decodes rows 0..len(idx)-1)."""
    n = idx.shape[0]
    for layer in model.layers:
        c = layer.self_attn.kv_cache
        c.k_cache[:n] = c.k_cache.index_select(0, idx)
        c.v_cache[:n] = c.v_cache.index_select(0, idx)


@contextlib.contextmanager
def _cache_row(model, i: int):
    """Point every layer's KV cache at its row i alone, so that a batch-1 forward reads and writes that row."""
    caches = [layer.self_attn.kv_cache for layer in model.layers]
    full = [(c.k_cache, c.v_cache) for c in caches]
    try:
        for c, (k, v) in zip(caches, full):
            c.k_cache, c.v_cache = k[i : i + 1], v[i : i + 1]
        yield
    finally:
        for c, (k, v) in zip(caches, full):
            c.k_cache, c.v_cache = k, v


def _emit(req: GenRequest, chunk: Chunk) -> None:
    try:
        req.emit(chunk)
    except Exception:  # noqa: BLE001 - a client's closed event loop must not stop the other rows
        log.debug("request %s: could not deliver a chunk", req.id, exc_info=True)
