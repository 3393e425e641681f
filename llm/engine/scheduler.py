"""The continuous-batching scheduler: one thread owns one llama context and decodes every sequence together.

Each step builds one batch of the next token of the generating sequences and bounded chunks of prompt tokens
for sequences still prefilling, as ``llm.engine.pacing`` plans it from what a step costs on this machine, and
makes one ``llama_decode`` call; then each sequence samples with its own chain. Requests join and leave between
steps, so nobody waits for another user's answer to end.

Each of the ``LLM_PARALLEL`` sequences has its own KV stream of a full context window. A unified cache (one
pool of cells shared by all sequences) was measured here first: every token attends over the whole used
range of the pool, so idle conversations kept in it made each step several times slower (6.6 -> 1.5 tokens/s
with 6,000 idle cells on 2 cores). With separate streams a step costs what its own sequences hold. A stream
keeps its last conversation after the answer, so a follow-up turn only prefills what is new, and a new request
takes the idle stream whose tokens share the longest prefix with its prompt (the personality's system
prompt). When a stream is taken, the conversation it held is saved to memory (bounded) if it is long enough
that restoring beats recomputing, and restored on its next turn.

llama.cpp decodes the tokens of separate streams in one pass over the weights only when their sequence ids are
consecutive; each gap between busy ids costs another pass. So a new request takes, among equally good streams,
one next to the busy ones, and a stream left behind a gap (its neighbour's answer ended) moves into it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from llm.engine import Handle, SamplingParams, Usage
from llm.engine.drafts import PromptLookup
from llm.engine.memory import describe, free_memory, plan_cache
from llm.engine.model import LoadedModel
from llm.engine.pacing import StepCost, plan_step
from llm.engine.sampling import TextStream, build_sampler, is_plain_greedy, token_logprob
from llm.errors import GenerationFailed, Overloaded, ServiceError
from llm.settings import Settings

log = logging.getLogger(__name__)

# Below this many cached tokens, recomputing a conversation is cheaper than keeping its saved state.
SUSPEND_MIN_TOKENS = 128
SOLO_PREFILL_TOKENS = 512  # prefill chunk when no stream is waiting for its next token
# Steps a gap between busy streams may last before one moves: answers that end together close it themselves
# (a move of two 150-token streams costs about one decode pass on the embedded model).
GAP_STEPS = 4


@dataclass
class Job:
    """One request inside the scheduler."""

    handle: Handle
    prompt: list[int]
    sampling: SamplingParams
    window: int
    conversation: str | None
    constraint: object | None = None  # a ConstraintState (llm.constraints) or None
    owner: str | None = None
    public: int = 0  # leading prompt tokens that are not private to the owner (the personality's system prompt)
    stops: tuple[str, ...] = ()
    pending: list[int] = field(default_factory=list)
    next_token: int | None = None
    generated: int = 0
    cached: int = 0
    sampler: object | None = None
    stream: TextStream | None = None
    first_token_at: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    lookup: PromptLookup | None = None  # prompt-lookup drafts (speculative decoding), when enabled


@dataclass
class Slot:
    """One llama sequence id and the tokens its KV cells hold."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    conversation: str | None = None
    owner: str | None = None  # whose text the cells hold beyond the public prefix
    last_used: float = 0.0
    job: Job | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared prefix of two token lists."""
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def reusable(slot: Slot, job: Job) -> int:
    """Cached tokens of a stream the job may reuse: all it shares with its owner's own text, else only the
    public prefix, so neither the answer nor its timing or cache figures depend on another user's prompt."""
    shared = common_prefix(slot.tokens, job.prompt)
    return shared if slot.owner == job.owner else min(shared, job.public)


def flash_attention(choice: str) -> int:
    """llama.cpp's flash attention type for LLM_FLASH_ATTENTION (``auto``: llama.cpp's choice, on where it can).
    ``off`` pays on a CPU once contexts are long: ggml's CPU flash attention gets dearer with each cached token
    faster than the plain path (embedded model, 2 threads: 32 new tokens after 865 cached 144 against 218 ms),
    but short contexts lose more than that gains (the full bench's 4-16 client rows 13-20% slower)."""
    return {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[choice]


def runs(busy: list[bool]) -> int:
    """How many passes over the weights llama.cpp makes for one token of each busy stream: one per run of
    consecutive busy sequence ids."""
    return sum(1 for i, flag in enumerate(busy) if flag and (i == 0 or not busy[i - 1]))


def compacting_swaps(busy: list[bool], held: list[int]) -> list[tuple[int, int]]:
    """Pairs (busy stream, idle stream) whose contents to exchange so that the busy streams sit on consecutive
    sequence ids: the window of ids needing the fewest exchanges, then the fewest cached tokens to copy
    (``held``: tokens each stream holds), then the lowest."""
    width = sum(busy)
    if runs(busy) <= 1:
        return []

    def plan(start: int) -> tuple[list[int], list[int]]:
        inside = range(start, start + width)
        return ([i for i, flag in enumerate(busy) if flag and i not in inside],
                [i for i in inside if not busy[i]])

    def cost(start: int) -> tuple[int, int, int]:
        outside, holes = plan(start)
        return len(outside), sum(held[i] for i in outside + holes), start

    outside, holes = plan(min(range(len(busy) - width + 1), key=cost))
    return list(zip(outside, holes, strict=True))


class SuspendedStore:
    """Saved sequence states of evicted conversations, least recently used dropped beyond a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[list[int], bytearray]] = OrderedDict()
        self._bytes = 0

    def put(self, key: str, tokens: list[int], state: bytearray) -> None:
        self.pop(key)
        if len(state) > self.max_bytes:
            return
        self._items[key] = (tokens, state)
        self._bytes += len(state)
        while self._bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self._bytes -= len(old)

    def pop(self, key: str) -> tuple[list[int], bytearray] | None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1])
        return item

    def peek_tokens(self, key: str) -> list[int] | None:
        item = self._items.get(key)
        return item[0] if item else None

    def __len__(self) -> int:
        return len(self._items)


class Scheduler:
    """Owns a llama context for one model and runs the decode loop on its own thread."""

    def __init__(self, model: LoadedModel, settings: Settings):
        self.model = model
        self.parallel = self._fitting_sequences(model, settings)
        self.queue_size = settings.queue_size
        self.batch_tokens = settings.batch_tokens
        self.draft_tokens = settings.draft_tokens
        # One stream per parallel sequence, each able to hold a whole context window.
        self.cache_tokens = max(settings.cache_tokens, model.spec.context_window * self.parallel)
        # Prompts are prefilled in chunks of LLM_BATCH_TOKENS while other streams are generating (so they keep
        # flowing), in larger chunks when none is: on a CPU a 512-token chunk prefills 13% faster than 256 (measured
        # on the embedded model; 1024 was slower again).
        self.solo_tokens = max(self.batch_tokens, SOLO_PREFILL_TOKENS)
        # A prompt chunk, plus one token and at most one draft per generating stream.
        self.n_batch = self.solo_tokens + self.parallel * (1 + self.draft_tokens)
        self.ctx = self._new_context(settings)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._logits_row = ctypes.c_float * self.model.n_vocab  # one row of logits, viewed in place (_sample)
        self.slots = [Slot(seq_id) for seq_id in range(self.parallel)]
        self.suspended = SuspendedStore(settings.suspend_mb * 1024 * 1024)
        self.counters = {"cache_hit_tokens": 0, "prompt_tokens": 0, "evictions": 0, "suspends": 0,
                         "restores": 0, "steps": 0, "drafted_tokens": 0, "accepted_draft_tokens": 0,
                         "moves": 0}
        self._queue: deque[Job] = deque()
        self._forget: set[str] = set()
        self._cond = threading.Condition()
        self._running = True
        self.last_step = time.monotonic()
        self.gap_steps = 0  # consecutive steps with a gap between busy streams (see _compact)
        self.cost = StepCost()  # what a decode step costs, learnt from every step (see llm.engine.pacing)
        self.stalled = 0  # prompt tokens decoded since the generating streams' last token
        self._held: list[tuple[Callable, tuple]] | None = None  # hand-outs held while a step is sampled
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{model.spec.name}", daemon=True)
        self._thread.start()

    @staticmethod
    def _fitting_sequences(model: LoadedModel, settings: Settings) -> int:
        """LLM_PARALLEL, lowered to what the free memory holds (read after the weights are loaded), logged."""
        on_gpu = model.gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        free, where = free_memory(on_gpu)
        plan = plan_cache(settings.parallel, model.spec.context_window, model.kv_bytes_per_token, free, where)
        log.log(*describe(plan, settings.parallel))
        return plan.parallel

    def _new_context(self, settings: Settings):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.cache_tokens
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.parallel
        params.n_threads = params.n_threads_batch = settings.cpu_threads
        params.kv_unified = False  # a stream per sequence: attention covers only that sequence's cells
        params.swa_full = True  # sliding-window models keep full history so cached prefixes can be reused
        params.flash_attn_type = flash_attention(settings.flash_attention)
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise MemoryError(f"could not create a llama context of {self.cache_tokens} tokens")
        return ctx

    # ----- called from request threads -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; raises Overloaded when every stream and the whole queue are taken."""
        with self._cond:
            if not self._running:
                raise ServiceError("The model is being unloaded; please retry.")
            if len(self._active()) + len(self._queue) >= self.parallel + self.queue_size:
                raise Overloaded()
            self._queue.append(job)
            self._cond.notify()

    def forget(self, conversation: str) -> None:
        """Drop a conversation's cache (done by the scheduler thread at its next step)."""
        with self._cond:
            self._forget.add(conversation)
            self._cond.notify()

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._active())

    def _active(self) -> list[Slot]:
        """The streams generating an answer right now."""
        return [slot for slot in self.slots if slot.job is not None]

    def stats(self) -> dict:
        return {
            "queue_depth": len(self._queue),
            "active_sequences": len(self._active()),
            "cached_conversations": sum(1 for slot in self.slots if slot.conversation and not slot.job),
            "suspended_conversations": len(self.suspended),
            "cache_tokens_used": self._cells_used(),
            "cache_tokens": self.cache_tokens,
            **self.cost.as_stats(),
            **self.counters,
        }

    def close(self) -> None:
        """Stop the thread, fail what is left, free the context."""
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout=30)
        for job in list(self._queue) + [slot.job for slot in self._active()]:
            job.handle.fail(ServiceError("The model was unloaded."))
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    # ----- the scheduler thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._queue and not self._forget and not self._active():
                    self._cond.wait()
                if not self._running:
                    return
                forget, self._forget = self._forget, set()
            try:
                self._forget_conversations(forget)
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as exc:  # never let one bad step kill the thread that serves everyone
                log.exception("scheduler step failed")
                self._fail_active(GenerationFailed(f"The engine failed: {exc}"))
            self.last_step = time.monotonic()

    def _forget_conversations(self, conversations: set[str]) -> None:
        for conversation in conversations:
            self.suspended.pop(conversation)
            for slot in self.slots:
                if slot.conversation == conversation and slot.job is None:
                    self._clear(slot)

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.handle.cancelled:
                self._finish(slot, "cancelled")
        with self._cond:
            kept = deque(job for job in self._queue if not job.handle.cancelled)
            dropped = [job for job in self._queue if job.handle.cancelled]
            self._queue = kept
        for job in dropped:
            job.handle.finish("cancelled", Usage(prompt_tokens=len(job.prompt)))

    def _admit(self) -> None:
        while len(self._active()) < self.parallel:  # so an idle stream exists for the next job
            with self._cond:
                if not self._queue:
                    return
                job = self._queue[0]
            slot = self._place(job)
            with self._cond:  # leave the queue and take the slot at once, so submit() never undercounts
                self._queue.popleft()
                slot.job = job
            self._start(slot, job)

    def _place(self, job: Job) -> Slot:
        """Choose the stream for a job, keeping the longest cached prefix of its prompt in it."""
        target = self._target_slot(job)
        own = reusable(target, job)
        saved = self.suspended.peek_tokens(job.conversation) if job.conversation else None
        if saved and common_prefix(saved, job.prompt) > own:
            self._evict(target)
            if self._restore(target, job.conversation):
                own = common_prefix(target.tokens, job.prompt)
        elif target.conversation != job.conversation:
            self._suspend(target)
        # At least one prompt token is decoded so there are logits to sample from.
        keep = min(own, len(job.prompt) - 1)
        if keep < len(target.tokens):
            if not llama_cpp.llama_memory_seq_rm(self.memory, target.seq_id, keep, -1):
                self._clear(target)
                keep = 0
            target.tokens = target.tokens[:keep]
        job.cached = keep
        return target

    def _target_slot(self, job: Job) -> Slot:
        """The job's own conversation's stream, else the idle stream sharing most of its prompt; on ties an empty
        one, then one next to the busy streams, then the least recently used."""
        idle = [slot for slot in self.slots if slot.job is None]
        if job.conversation:
            for slot in idle:
                if slot.conversation == job.conversation:
                    return slot
        busy = [slot.job is not None for slot in self.slots]

        def passes(slot: Slot) -> int:  # decode passes per step with the job there (see _compact)
            return runs([flag or i == slot.seq_id for i, flag in enumerate(busy)])

        return max(idle, key=lambda slot: (reusable(slot, job), slot.conversation is None, -passes(slot),
                                           -slot.last_used))

    def _cells_used(self) -> int:
        return sum(len(slot.tokens) for slot in self.slots)

    def _suspend(self, slot: Slot) -> None:
        """A stream changes hands: keep its conversation in memory when that beats recomputing it later.

        The cells stay (the new owner may share their prefix); only the conversation's claim on them goes."""
        if slot.conversation and len(slot.tokens) >= SUSPEND_MIN_TOKENS:
            state = self._save_state(slot, self.suspended.max_bytes)
            if state:
                self.suspended.put(slot.conversation, list(slot.tokens), state)
                self.counters["suspends"] += 1
        if slot.conversation:
            self.counters["evictions"] += 1
        slot.conversation = None

    def _evict(self, slot: Slot) -> None:
        """Free a stream entirely, suspending its conversation first."""
        self._suspend(slot)
        self._clear(slot)

    def _save_state(self, slot: Slot, limit: int | None = None) -> bytearray | None:
        """The sequence's cache as bytes (None when empty or over ``limit``), read straight into the buffer that is
        returned: slicing a ctypes array instead (``buf[:n]``) builds a list of Python ints, which took a second
        for a 1,700-token conversation, with every stream waiting."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
        if size <= 0 or (limit is not None and size > limit):
            return None
        state = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(state), size,
                                                     slot.seq_id)
        del state[written:]
        return state or None

    def _load_state(self, slot: Slot, state: bytearray) -> bool:
        """Write a saved cache into an empty sequence (no copy of the buffer on the way)."""
        source = (ctypes.c_uint8 * len(state)).from_buffer(state)
        return bool(llama_cpp.llama_state_seq_set_data(self.ctx, source, len(state), slot.seq_id))

    def _restore(self, slot: Slot, conversation: str) -> bool:
        item = self.suspended.pop(conversation)
        if item is None:
            return False
        tokens, state = item
        self._clear(slot)
        if not self._load_state(slot, state):
            self._clear(slot)
            return False
        slot.tokens, slot.conversation = tokens, conversation
        self.counters["restores"] += 1
        return True

    def _compact(self) -> None:
        """Keep the busy streams on consecutive sequence ids. With a KV stream per sequence, llama.cpp decodes
        the tokens of a batch in one pass over the weights only for consecutive ids (``split_equal``): four
        streams on ids 0, 2, 4 and 6 took 50 ms a step against 35 ms on 0-3 (embedded model, 2 cores). A stream
        left alone when its neighbour's answer ends moves into the gap: one copy of the cells of the two
        streams exchanged, paid once, where the gap costs every step, once it has lasted ``GAP_STEPS``."""
        busy = [slot.job is not None for slot in self.slots]
        self.gap_steps = self.gap_steps + 1 if runs(busy) > 1 else 0
        if self.gap_steps <= GAP_STEPS:
            return
        self.gap_steps = 0
        for i, j in compacting_swaps(busy, [len(slot.tokens) for slot in self.slots]):
            self._swap(self.slots[i], self.slots[j])
            self.counters["moves"] += 1

    def _swap(self, a: Slot, b: Slot) -> None:
        """Exchange the cells and everything else two streams hold; their sequence ids stay."""
        states = {a.seq_id: self._save_state(a), b.seq_id: self._save_state(b)}
        with self._cond:  # submit() counts busy streams: never let it see the job in both or neither
            for name in ("tokens", "conversation", "owner", "last_used", "job"):
                first, second = getattr(a, name), getattr(b, name)
                setattr(a, name, second)
                setattr(b, name, first)
        for slot in (a, b):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        for slot, came_from in ((a, b), (b, a)):
            state = states[came_from.seq_id]
            if slot.tokens and not (state and self._load_state(slot, state)):
                self._clear(slot)  # its cells, not its job
                if slot.job is not None:  # only if llama.cpp could not take back what it gave: never seen
                    self._finish(slot, "error", GenerationFailed("The engine could not move this answer."))

    def _clear(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.tokens, slot.conversation, slot.owner = [], None, None

    def _start(self, slot: Slot, job: Job) -> None:
        model = self.model
        job.pending = job.prompt[len(slot.tokens):]
        if not is_plain_greedy(job.sampling):  # plain greedy is the argmax, taken in _sample
            job.sampler = build_sampler(job.sampling, model.vocab, model.n_vocab, model.end_tokens)
        job.stream = TextStream(tuple(job.sampling.stop) + job.stops)
        if self.draft_tokens and job.sampling.speculative:
            job.lookup = PromptLookup(job.prompt, self.draft_tokens)
        slot.job, slot.conversation, slot.owner, slot.last_used = job, job.conversation, job.owner, time.monotonic()
        self.counters["cache_hit_tokens"] += job.cached
        self.counters["prompt_tokens"] += len(job.prompt)

    def _step(self) -> None:
        """Fill one batch as ``plan_step`` says (llm.engine.pacing), decode it, sample every sequence that produced
        logits."""
        self._compact()
        active = self._active()
        if not active:
            return
        generating = [slot for slot in active if slot.job.next_token is not None]
        prompts = sorted((slot for slot in active if slot.job.next_token is None and slot.job.pending),
                         key=lambda slot: slot.job.submitted)
        plan = plan_step(len(generating), [len(slot.job.pending) for slot in prompts], self.stalled,
                         self.batch_tokens if generating else self.solo_tokens, self.cost)
        batch, rows = self.batch, []
        batch.n_tokens = 0
        for slot in generating if plan.decode else ():  # one token each, and a draft where there is one
            job = slot.job
            draft = self._draft(slot)
            last = self._add(slot, [job.next_token, *draft], logits=True, every=True)
            rows.append((slot, last - len(draft), draft))
        # Prompt chunks in sequence order (llama.cpp passes over consecutive ids together), whichever came first.
        for index, tokens in sorted(plan.chunks, key=lambda chunk: prompts[chunk[0]].seq_id):
            slot = prompts[index]
            job = slot.job
            chunk, job.pending = job.pending[:tokens], job.pending[tokens:]
            last = self._add(slot, chunk, logits=not job.pending)
            if not job.pending:
                rows.append((slot, last, []))
        if batch.n_tokens == 0:
            return
        if not self._decode():
            return
        self.stalled = self.stalled + plan.prompt_tokens if generating and not plan.decode else 0
        self.counters["steps"] += 1
        self._held = []
        try:
            for slot, index, draft in rows:
                if draft:
                    self._verify(slot, index, draft)
                else:
                    self._sample(slot, index)
        finally:
            held, self._held = self._held, None
            for action, args in held:
                action(*args)

    def _deliver(self, action: Callable, *args) -> None:
        """Hand a piece, an end or an error to the answer's thread; while a step is being sampled, once every
        stream has been sampled.

        A handed-out piece wakes its answer thread, which then wants the GIL; every ctypes call of the sampling
        that follows releases it, so sampling the other streams waited on that thread's Python (framing, the event
        loop) while llama.cpp's worker spun. Held to the end of the step, the answer threads run during the next
        ``llama_decode`` instead: the Python between two decodes went from 1.2-1.5 to 0.4 ms (median, 4
        clients, ``bench/cpu.py``)."""
        if self._held is None:
            action(*args)
        else:
            self._held.append((action, args))

    def _draft(self, slot: Slot) -> list[int]:
        """Draft tokens to check in this step, never past the answer's token limit or the context window."""
        job = slot.job
        if job.lookup is None:
            return []
        # Room such that no draft token can reach a limit the one-by-one answer would not have reached yet.
        room = min(job.sampling.max_tokens - job.generated - 1, job.window - len(slot.tokens) - 3)
        return job.lookup.draft(room)

    def _verify(self, slot: Slot, index: int, draft: list[int]) -> None:
        """Sample at the next token and at each draft token in turn (each with the logits of the token before
        it, exactly as decoding them one by one would), keep the draft while the samples reproduce it, and drop
        the rest of it from the cache."""
        job = slot.job
        start = len(slot.tokens) - len(draft)  # cache position of the first draft token
        accepted = 0
        for offset in range(len(draft) + 1):
            token = self._sample(slot, index + offset)
            if slot.job is not job or offset == len(draft) or token != draft[offset]:
                break
            accepted += 1
        if start + accepted < len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, start + accepted, -1)
            slot.tokens = slot.tokens[:start + accepted]
        job.lookup.feedback(len(draft), accepted)
        self.counters["drafted_tokens"] += len(draft)
        self.counters["accepted_draft_tokens"] += accepted

    def _add(self, slot: Slot, tokens: list[int], logits: bool, every: bool = False) -> int:
        """Append tokens of one sequence to the batch (logits for the last one, or for ``every`` one); returns
        the batch index of the last one."""
        batch = self.batch
        start = len(slot.tokens)
        for offset, token in enumerate(tokens):
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = start + offset
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = logits and (every or offset == len(tokens) - 1)
            batch.n_tokens += 1
        slot.tokens.extend(tokens)
        return batch.n_tokens - 1

    def _decode(self) -> bool:
        """One llama_decode, timed for the cost model; if it fails, undo the batch and fail the newest job rather
        than everyone."""
        started = time.perf_counter()
        result = llama_cpp.llama_decode(self.ctx, self.batch)
        if result == 0:
            # A GPU may still be computing (llama_decode only queues it there); sampling waits for it anyway.
            llama_cpp.llama_synchronize(self.ctx)
            self.cost.observe(self.batch.n_tokens, time.perf_counter() - started)
            return True
        self._rollback_batch()
        newest = max(self._active(), key=lambda slot: slot.job.submitted)
        log.warning("llama_decode returned %d; failing the newest request", result)
        self._finish(newest, "error", Overloaded("The model could not take this request now; please retry."))
        return False

    def _rollback_batch(self) -> None:
        """Forget the tokens of a batch that was not decoded so slot bookkeeping matches the cache."""
        batch = self.batch
        for slot in self.slots:
            if slot.job is None:
                continue
            added = [i for i in range(batch.n_tokens) if batch.seq_id[i][0] == slot.seq_id]
            if added:
                first_pos = batch.pos[added[0]]
                tokens = [batch.token[i] for i in added]
                llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, first_pos, -1)
                slot.tokens = slot.tokens[:first_pos]
                if slot.job.next_token is None:
                    slot.job.pending = tokens + slot.job.pending
        batch.n_tokens = 0

    def _sample(self, slot: Slot, index: int) -> int | None:
        """Sample the slot's next token from the logits at batch ``index``, deliver it, and finish the job when
        it ends there; returns the token (None when the job failed)."""
        job, model = slot.job, self.model
        wants_logprobs = job.sampling.logprobs is not None
        if job.constraint is not None or wants_logprobs or job.sampler is None:
            row = llama_cpp.llama_get_logits_ith(self.ctx, index).contents  # viewed in place: as_array costs 4x
            logits = np.frombuffer(self._logits_row.from_address(ctypes.addressof(row)), np.float32)
        if job.constraint is not None:
            try:
                job.constraint.mask_logits(logits)
            except ServiceError as exc:  # e.g. the grammar engine hit a resource limit
                self._finish(slot, "error", exc)
                return
        if job.sampler is None:  # plain greedy: the first highest logit, as llama.cpp's greedy sampler picks
            token = int(logits.argmax())
        else:
            token = llama_cpp.llama_sampler_sample(job.sampler, self.ctx, index)
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if job.constraint is not None:
            try:
                job.constraint.accept(token)
            except ServiceError as exc:
                self._finish(slot, "error", exc)
                return
        if model.is_eog(token):
            self._finish(slot, "stop")
            return
        job.generated += 1
        if wants_logprobs:
            job.handle.logprobs.append(token_logprob(logits, token, job.sampling.logprobs, model.piece))
        if job.lookup is not None:
            job.lookup.extend([token])
        self._deliver(job.handle.push, job.stream.feed(model.piece(token)))
        if job.stream.stopped or (job.constraint is not None and job.constraint.is_finished()):
            job.handle.stop_sequence = job.stream.matched
            self._finish(slot, "stop")
        elif job.generated >= job.sampling.max_tokens or len(slot.tokens) + 1 >= job.window:
            self._finish(slot, "length")
        else:
            job.next_token = token
        return token

    def _finish(self, slot: Slot, reason: str, error: ServiceError | None = None) -> None:
        job = slot.job
        slot.job, slot.last_used = None, time.monotonic()
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
        if job.pending:  # cancelled during prefill: the cache holds only what was decoded
            job.pending = []
        if error is not None:
            self._deliver(job.handle.fail, error)
            return
        if reason != "cancelled" and job.stream is not None:
            self._deliver(job.handle.push, job.stream.flush())
        self._deliver(job.handle.finish, reason, self._usage(job))

    def _usage(self, job: Job) -> Usage:
        now = time.monotonic()
        ttft = None if job.first_token_at is None else job.first_token_at - job.submitted
        elapsed = now - job.first_token_at if job.first_token_at else 0.0
        rate = (job.generated - 1) / elapsed if job.generated > 1 and elapsed > 0 else None
        return Usage(prompt_tokens=len(job.prompt), completion_tokens=job.generated, cached_tokens=job.cached,
                     time_to_first_token=ttft, tokens_per_second=rate)

    def _fail_active(self, error: ServiceError) -> None:
        for slot in self._active():
            self._finish(slot, "error", error)
            self._clear(slot)
