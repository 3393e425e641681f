"""Text embeddings for ``/v1/embeddings``: an embedding model that works offline, loaded on first use.

``LLM_EMBEDDING_MODEL`` chooses it:

* ``wordllama`` (default): WordLlama ``l2_supercat`` (MIT, 16 MB of weights shipped in the ``wordllama`` wheel on
  PyPI, 256 dimensions, truncatable to 128 or 64). A static embedding model: token vectors distilled from
  large models' embedding tables, mean-pooled, so it embeds thousands of passages per second on a CPU. Chosen
  because it is the only maintained PyPI package found that ships embedding weights *and* its tokenizer, so it
  installs with pip and runs with no download (sentence-transformers, fastembed and model2vec fetch their
  weights from Hugging Face at first use).
* a path to a GGUF embedding model (nomic-embed, bge, all-MiniLM... converted by llama.cpp): run by llama.cpp
  in embedding mode with the file's own pooling, batched several inputs per decode.
* ``chat``: the chat model's own hidden states, mean-pooled. A labelled fallback (the model name says
  ``pooled``): a generative model's states rank related text far less reliably than an embedding model's.
* ``off``: ``/v1/embeddings`` answers 400.

Every vector is L2-normalised (as OpenAI's are), so a dot product is the cosine similarity.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from llm.errors import BadRequest, ConfigError

MAX_INPUTS = 2048  # OpenAI's limits on one request
MAX_REQUEST_TOKENS = 300_000
WORDLLAMA_TOKENS = 8192  # a static model has no context window; this bounds one input's cost
PADDED_TOKENS = 65_536  # WordLlama's batch is (texts x longest x 256) floats: 64 MiB at most


class Embedder(Protocol):
    """A loaded embedding model."""

    name: str
    dimensions: int
    max_tokens: int
    sizes: tuple[int, ...]  # the ``dimensions`` a client may ask for

    def count(self, texts: list[str]) -> list[int]:
        """Tokens each text takes."""

    def embed(self, texts: list[str], counts: list[int]) -> np.ndarray:
        """One row per text (not yet normalised); ``counts`` are the texts' token counts."""


class WordLlamaEmbedder:
    """WordLlama's l2_supercat model from the files in its wheel (its loader would look for the tokenizer in
    the wrong folder and try to download it, so the two files are opened directly)."""

    name = "wordllama-l2-supercat"
    max_tokens = WORDLLAMA_TOKENS
    sizes = (64, 128, 256)

    def __init__(self):
        import wordllama
        from safetensors import safe_open
        from wordllama.inference import WordLlamaInference

        root = Path(wordllama.__file__).parent
        tokenizer = wordllama.WordLlama.load_tokenizer(root / "tokenizers" / "l2_supercat_tokenizer_config.json")
        with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np") as weights:
            table = weights.get_tensor("embedding.weight")
        self._model = WordLlamaInference(table, tokenizer)
        self._tokenizer = tokenizer
        self.dimensions = table.shape[1]

    def count(self, texts: list[str]) -> list[int]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [sum(encoding.attention_mask) for encoding in encodings]  # the tokenizer pads a batch

    def embed(self, texts: list[str], counts: list[int]) -> np.ndarray:
        """Texts of similar length batched together: WordLlama pads a batch to its longest text, so one long text
        among 64 short ones would cost 64 long ones in memory (bounded here to PADDED_TOKENS per batch)."""
        order = sorted(range(len(texts)), key=counts.__getitem__)
        rows = np.empty((len(texts), self.dimensions), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * max(counts[order[end]], 1) <= PADDED_TOKENS:
                end += 1
            group = order[start:end]
            rows[group] = self._model.embed([texts[i] for i in group], batch_size=len(group))
            start = end
        return rows


class LlamaEmbedder:
    """A GGUF model in llama.cpp's embedding mode; one decode serves several inputs. Calls are serialised (a
    llama context is not thread-safe)."""

    sizes: tuple[int, ...] = ()

    def __init__(self, path: str, name: str, threads: int, gpu_layers: int, window: int):
        import llama_cpp

        probe = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        trained = probe._model.n_ctx_train() or window
        pools = any(key.endswith(".pooling_type") for key in probe.metadata)
        probe.close()
        self.max_tokens = min(trained, window)
        # An embedding model's file names its pooling; a generative model's states are mean-pooled.
        pooling = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if pools else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._llama = llama_cpp.Llama(path, embedding=True, n_ctx=self.max_tokens, n_batch=self.max_tokens,
                                      n_ubatch=self.max_tokens, n_threads=threads, n_gpu_layers=gpu_layers,
                                      pooling_type=pooling, verbose=False)
        self.name, self.dimensions = name, self._llama.n_embd()
        self.sizes = (self.dimensions,)
        self._lock = threading.Lock()

    def count(self, texts: list[str]) -> list[int]:
        return [len(self._llama.tokenize(text.encode("utf-8"))) for text in texts]

    def embed(self, texts: list[str], counts: list[int]) -> np.ndarray:
        with self._lock:
            return np.asarray(self._llama.embed(texts, truncate=False), dtype=np.float32)


class Embeddings:
    """The service's embedding model (loaded on first use, once) and the request limits around it."""

    def __init__(self, settings, chat_model_path):
        choice = settings.embedding_model
        if choice not in ("wordllama", "chat", "off") and not Path(choice).is_file():
            raise ConfigError(f"LLM_EMBEDDING_MODEL={choice!r} is not wordllama, chat, off or a GGUF file.")
        self.settings = settings
        self._chat_model_path = chat_model_path  # () -> the default chat model's GGUF path
        self._model: Embedder | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.settings.embedding_model != "off"

    @property
    def name(self) -> str:
        """The model's name, known without loading it (for ``/v1/models``)."""
        choice = self.settings.embedding_model
        if choice == "wordllama":
            return WordLlamaEmbedder.name
        return f"{Path(self._chat_model_path()).stem}-pooled" if choice == "chat" else Path(choice).stem

    def model(self) -> Embedder:
        """The loaded model; the first call loads it (WordLlama: about a second)."""
        if not self.enabled:
            error = BadRequest("Embeddings are turned off on this service (LLM_EMBEDDING_MODEL=off).", param="model")
            error.code = "embeddings_not_supported"
            raise error
        with self._lock:
            if self._model is None:
                self._model = self._load(self.settings.embedding_model)
            return self._model

    def _load(self, choice: str) -> Embedder:
        from llm.engine.model import gpu_layers
        from llm.settings import physical_cores

        settings = self.settings
        threads, layers = settings.cpu_threads or physical_cores(), gpu_layers(settings.gpu_layers)
        if choice == "wordllama":
            return WordLlamaEmbedder()
        path = self._chat_model_path() if choice == "chat" else choice
        return LlamaEmbedder(path, self.name, threads, layers, settings.context_window)

    def create(self, texts: list[str], dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """Unit vectors for ``texts`` (truncated to ``dimensions`` first) and the tokens they took."""
        model = self.model()
        if dimensions is not None and dimensions not in model.sizes:
            raise BadRequest(f"'dimensions' must be one of {', '.join(map(str, model.sizes))} for {model.name}.",
                             param="dimensions")
        counts = model.count(texts)
        for index, count in enumerate(counts):
            if count > model.max_tokens:
                raise BadRequest(f"input[{index}] has {count} tokens; {model.name} reads at most {model.max_tokens}.",
                                 param="input")
        if sum(counts) > MAX_REQUEST_TOKENS:
            raise BadRequest(f"The inputs have {sum(counts)} tokens; one request may have at most "
                             f"{MAX_REQUEST_TOKENS}.", param="input")
        vectors = model.embed(texts, counts)[:, :dimensions or model.dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1, norms), sum(counts)
