"""The real engine: loaded models, each with its scheduler, behind the ``Engine`` interface.

Every distinct GGUF is loaded once and shared by all personalities that name it (same batch, same cache).
At most ``LLM_MAX_LOADED_MODELS`` stay loaded; to make room the least recently used idle one is unloaded.
Formatting, tokenizing, budget checks and schema compilation happen here, in the caller's thread, so the
scheduler thread only ever decodes and samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from llm.engine import GenerationRequest, GrammarConstraint, Handle, Message
from llm.engine.model import LlamaLog, LoadedModel
from llm.engine.scheduler import Job, Scheduler, common_prefix
from llm.errors import Overloaded, PayloadTooLarge
from llm.models import ModelSpec
from llm.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """A loaded model, its scheduler and (built on first use) its schema compiler."""

    model: LoadedModel
    scheduler: Scheduler
    compiler: Any = None
    last_used: float = 0.0


class ModelPool:
    """Implements ``llm.engine.Engine`` on llama.cpp."""

    def __init__(self, settings: Settings):
        self.settings = settings
        LlamaLog.install()
        LlamaLog.verbose(settings.verbose_engine)
        self._workers: OrderedDict[str, Worker] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: set[str] = set()
        self.load_errors: dict[str, str] = {}

    # ----- models ----------------------------------------------------------------------------------------

    def preload(self, spec: ModelSpec) -> threading.Thread:
        """Load a model in the background so start-up returns at once and /health can say 'loading'."""
        self._loading.add(spec.path)

        def run() -> None:
            try:
                self._worker(spec)
            except Exception as exc:  # reported by /health; requests will retry the load and raise
                log.error("loading %s failed: %s", spec.path, exc)
                self.load_errors[spec.path] = str(exc)
            finally:
                self._loading.discard(spec.path)

        thread = threading.Thread(target=run, name="model-preload", daemon=True)
        thread.start()
        return thread

    def _worker(self, spec: ModelSpec) -> Worker:
        with self._lock:
            worker = self._workers.get(spec.path)
            if worker is None:
                self._make_room()
                model = LoadedModel(spec, self.settings)
                try:
                    worker = Worker(model, Scheduler(model, self.settings))
                except Exception:
                    model.close()
                    raise
                self._workers[spec.path] = worker
                self.load_errors.pop(spec.path, None)
            self._workers.move_to_end(spec.path)
            worker.last_used = time.monotonic()
            return worker

    def _make_room(self) -> None:
        while len(self._workers) >= self.settings.max_loaded_models:
            idle = [path for path, worker in self._workers.items() if not worker.scheduler.busy]
            if not idle:
                raise Overloaded("Every loaded model is busy; please retry shortly.")
            path = idle[0]  # OrderedDict order is least recently used first
            log.info("unloading %s to make room", path)
            self._close(self._workers.pop(path))

    def _compiler(self, worker: Worker):
        if worker.compiler is None:
            from llm.engine.constraints import ConstraintCompiler

            worker.compiler = ConstraintCompiler.for_llama_model(worker.model.vocab, worker.model.n_vocab)
        return worker.compiler

    # ----- the Engine interface --------------------------------------------------------------------------

    @staticmethod
    def _prompt_tokens(worker: Worker, request: GenerationRequest) -> list[int]:
        """The tokens the model will read for this request."""
        if request.raw_prompt is not None:
            return worker.model.tokenize(request.raw_prompt)
        return worker.model.tokenize_messages(request.messages)

    @staticmethod
    def _public_tokens(worker: Worker, request: GenerationRequest, tokens: list[int]) -> int:
        """How many leading prompt tokens anyone may share: those of the personality's own system prompt."""
        if not request.public_prefix or request.raw_prompt is not None:
            return 0
        return common_prefix(worker.model.tokenize_messages(request.public_prefix, False), tokens)

    def submit(self, request: GenerationRequest) -> Handle:
        worker = self._worker(request.model)
        tokens = self._prompt_tokens(worker, request)
        window = request.model.context_window
        if len(tokens) >= window:
            raise PayloadTooLarge(
                f"The prompt takes {len(tokens)} tokens but the context window is {window} tokens; "
                f"shorten the prompt or its context.")
        sampling = request.sampling
        if len(tokens) + sampling.max_tokens > window:
            sampling = replace(sampling, max_tokens=window - len(tokens))
        constraint = None
        if request.constraint is not None:
            compiler = self._compiler(worker)
            grammar = (compiler.compile_lark(worker.model.with_special_rule(request.constraint))
                       if isinstance(request.constraint, GrammarConstraint)
                       else compiler.compile_json(request.constraint.schema))
            constraint = grammar.new_state()
        handle = Handle(timeout=min(request.timeout or self.settings.request_timeout, self.settings.request_timeout))
        job = Job(handle=handle, prompt=tokens, sampling=sampling, window=window,
                  conversation=request.conversation, constraint=constraint,
                  stops=worker.model.chat_format.stops, owner=request.owner,
                  public=self._public_tokens(worker, request, tokens))
        worker.scheduler.submit(job)
        return handle

    def count_tokens(self, model: ModelSpec, messages: Sequence[Message]) -> int:
        return len(self._worker(model).model.tokenize_messages(messages))

    def count_text_tokens(self, model: ModelSpec, text: str) -> int:
        return len(self._worker(model).model.tokenize_plain(text))

    def tool_format(self, model: ModelSpec) -> str:
        return self._worker(model).model.tool_format.name

    def forget(self, conversation: str) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.scheduler.forget(conversation)

    def describe(self, model: ModelSpec) -> dict[str, Any]:
        worker = self._workers.get(model.path)
        info = {"name": model.name, "path": model.path, "context_window": model.context_window,
                "loaded": worker is not None}
        if worker is not None:
            info.update(architecture=worker.model.architecture, chat_format=worker.model.chat_format.name,
                        tool_format=worker.model.tool_format.name, gpu_layers=worker.model.gpu_layers)
        return info

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "loading": sorted(self._loading),
                "load_errors": dict(self.load_errors),
                "models": {worker.model.spec.name: {**worker.scheduler.stats(),
                                                    "last_step_age": time.monotonic() - worker.scheduler.last_step}
                           for worker in self._workers.values()},
            }

    def close(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                self._close(worker)
            self._workers.clear()

    @staticmethod
    def _close(worker: Worker) -> None:
        """Stop the scheduler, then the compiler (its tokenizer borrows the model's vocab), then the model."""
        worker.scheduler.close()
        if worker.compiler is not None:
            worker.compiler.close()
        worker.model.close()
