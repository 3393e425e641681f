"""Knowledge bases: bases, documents (with their original bytes, for download and re-indexing), passages, and
two indexes over the passages, each made for the job (``llm.knowledge.backends``: FTS5 and sqlite-vec in SQLite,
tsvector and cube in PostgreSQL): full text, and vectors of the service's embedding model (WordLlama by
default).

A question is searched both ways and the two rankings are fused by reciprocal rank (each passage scores
``1 / (60 + rank)`` per ranking it appears in), which needs no calibration between full-text scores and vector
distances.

Every call names the user; a base is only ever read or changed by its owner, except that a personality may
name ``owner/base`` in its file to search it for everyone who talks to it (read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.errors import BadRequest, FileTooLarge, NotFound
from llm.knowledge.backends import is_postgres, open_backend
from llm.knowledge.documents import Limits, read

RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_WORD = re.compile(r"\w+", re.UNICODE)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """A passage found for a question, with where it comes from."""

    base_id: int
    base: str
    document_id: int
    document: str
    location: str
    text: str
    score: float


class KnowledgeIndex:
    """The knowledge store of one service; safe to share between threads."""

    def __init__(self, location: str, embeddings: Any = None, limits: Limits | None = None, quota_bytes: int = 0):
        """``location``: a SQLite file path or a PostgreSQL URL (``llm.knowledge.backends``); ``embeddings``: the
        service's embedding model (``llm.engine.embeddings.Embeddings``), or None for full-text search only (a
        change of model re-embeds every passage); ``quota_bytes``: what one user's documents may weigh (0: no
        limit). The store is opened on first use: most requests never touch it."""
        self.location, self.limits, self.quota_bytes = location, limits or Limits(), quota_bytes
        self._embeddings = embeddings if embeddings is not None and embeddings.enabled else None
        self._lock = threading.RLock()
        self._db: Any = None
        self._dimensions: int | None = None  # of the stored vectors; 0: none (full text only)

    def _open(self) -> None:
        with self._lock:
            if self._db is None:
                self._db = open_backend(self.location)
                self._dimensions = self._vectors_ready() if self._embeddings is not None else 0

    @property
    def _never_used(self) -> bool:
        """No base can exist yet: a SQLite file that was never made."""
        return self._db is None and not is_postgres(self.location) and (
            self.location == ":memory:" or not Path(self.location).exists())

    # ----- set-up ----------------------------------------------------------------------------------------

    def _vectors_ready(self) -> int:
        """The vectors of the current embedding model, in as many dimensions as the backend holds; every passage
        is embedded again when the model changed since the last start."""
        sizes = self._embeddings.model().sizes
        limit = self._db.max_dimensions
        dimensions = max(sizes) if limit is None else max((size for size in sizes if size <= limit), default=0)
        if not dimensions:
            log.warning("knowledge bases: %s has no vector size this store holds; full-text search only",
                        self._embeddings.name)
            return 0
        model = f"{self._embeddings.name}/{dimensions}"
        self._dimensions = dimensions
        with self._transaction():
            row = self._db.rows("select value from knowledge_meta where key = 'embeddings'")
            if row and row[0][0] == model:
                return dimensions
            self._db.reset_vectors(dimensions)
            self._store_vectors(self._db.rows("select id, base_id, text from knowledge_passages"))
            self._db.rows("delete from knowledge_meta where key = 'embeddings'")
            self._db.rows("insert into knowledge_meta values ('embeddings', ?)", (model,))
        return dimensions

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._embeddings.create(texts, self._dimensions)[0], dtype=np.float32)

    def _vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embeddings of ``texts`` (none without a vector index), in batches; computed before the lock is taken
        where possible, so one large upload never holds up other users' questions."""
        if not self._dimensions:
            return []
        return [vector for start in range(0, len(texts), 256) for vector in self._embed(list(texts[start:start + 256]))]

    def _store_vectors(self, rows: Sequence[tuple[int, int, str]]) -> None:
        vectors = self._vectors([text for _, _, text in rows])
        self._db.add_vectors([(pid, bid, vector) for (pid, bid, _), vector in zip(rows, vectors, strict=True)])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All of it or nothing, under the lock."""
        with self._lock, self._db.transaction():
            yield

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ----- bases -----------------------------------------------------------------------------------------

    def create_base(self, owner: str, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest("A knowledge base name is 1-64 letters, digits, spaces, '.', '_' or '-'.", param="name")
        self._open()
        try:
            with self._transaction():
                base_id = self._db.insert("insert into knowledge_bases(owner, name, created) values (?, ?, ?)",
                                          (owner, name, time.time()))
        except self._db.integrity_error:
            raise BadRequest(f"You already have a knowledge base named {name!r}.", param="name") from None
        return self.base(owner, base_id)

    def bases(self, owner: str) -> list[dict[str, Any]]:
        self._open()
        with self._lock:
            rows = self._db.rows(
                "select b.id, b.name, b.created, count(d.id), coalesce(sum(d.bytes), 0), coalesce(sum(d.passages), 0) "
                "from knowledge_bases b left join knowledge_documents d on d.base_id = b.id where b.owner = ? "
                "group by b.id, b.name, b.created order by b.name", (owner,))
        return [_base(row) for row in rows]

    def base(self, owner: str, base_id: int) -> dict[str, Any]:
        found = [base for base in self.bases(owner) if base["id"] == base_id]
        if not found:
            raise NotFound(f"No knowledge base {base_id} of yours.")
        return found[0]

    def delete_base(self, owner: str, base_id: int) -> None:
        self.base(owner, base_id)
        with self._transaction():
            self._forget_passages("base_id = ?", (base_id,))
            self._db.rows("delete from knowledge_bases where id = ?", (base_id,))

    def searchable(self, owner: str | None, shared: Sequence[str] = ()) -> list[int]:
        """The bases a question of ``owner`` (None: a user without an identity of their own) searches: their own
        and those a personality shares; nothing (and no file opened, no model loaded) while no base exists."""
        if self._never_used or not (owner or shared):
            return []
        self._open()
        with self._lock:  # every question asks this: the ids alone, not the figures bases() adds up
            ids = [row[0] for row in self._db.rows("select id from knowledge_bases where owner = ?", (owner,))
                   ] if owner else []
        return ids + [base_id for base_id in map(self.shared, shared) if base_id is not None]

    def shared(self, reference: str) -> int | None:
        """The id of the base a personality names as ``owner/name``, or None if there is none (yet)."""
        owner, _, name = reference.partition("/")
        self._open()
        with self._lock:
            rows = self._db.rows("select id from knowledge_bases where owner = ? and name = ?", (owner, name))
        return rows[0][0] if rows else None

    # ----- documents -------------------------------------------------------------------------------------

    def add_document(self, owner: str, base_id: int, name: str, data: bytes) -> dict[str, Any]:
        """Read, index and keep one upload; the whole document or nothing."""
        self.base(owner, base_id)
        name = Path(name or "document").name[:200] or "document"
        if self.quota_bytes:
            with self._lock:
                used = self._db.rows("select coalesce(sum(d.bytes), 0) from knowledge_documents d join "
                                     "knowledge_bases b on b.id = d.base_id where b.owner = ?", (owner,))[0][0]
            if used + len(data) > self.quota_bytes:
                raise FileTooLarge(f"{name} would bring your documents to {used + len(data)} bytes; each user may "
                                   f"keep {self.quota_bytes}.")
        kind, passages, pages = read(name, data, self.limits)
        vectors = self._vectors([passage.text for passage in passages])
        with self._transaction():
            document_id = self._db.insert(
                "insert into knowledge_documents(base_id, name, kind, bytes, sha256, pages, passages, original, "
                "created) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (base_id, name, kind, len(data), hashlib.sha256(data).hexdigest(), pages, len(passages), data,
                 time.time()))
            self._index(document_id, base_id, passages, vectors)
        return self.document(owner, base_id, document_id)

    def _index(self, document_id: int, base_id: int, passages, vectors: Sequence[np.ndarray]) -> None:
        rows = []
        for passage in passages:
            passage_id = self._db.insert("insert into knowledge_passages(document_id, base_id, location, text) "
                                         "values (?, ?, ?, ?)", (document_id, base_id, passage.location, passage.text))
            self._db.add_text(passage_id, f"{passage.location}\n{passage.text}")
            rows.append(passage_id)
        if vectors:
            self._db.add_vectors([(pid, base_id, vector) for pid, vector in zip(rows, vectors, strict=True)])

    def _forget_passages(self, where: str, params: tuple) -> None:
        ids = [row[0] for row in self._db.rows(f"select id from knowledge_passages where {where}", params)]
        for start in range(0, len(ids), 500):
            self._db.forget(ids[start:start + 500], bool(self._dimensions))
        self._db.rows(f"delete from knowledge_passages where {where}", params)

    def documents(self, owner: str, base_id: int) -> list[dict[str, Any]]:
        self.base(owner, base_id)
        with self._lock:
            rows = self._db.rows("select id, name, kind, bytes, pages, passages, created, sha256 from "
                                 "knowledge_documents where base_id = ? order by id", (base_id,))
        return [_document(row) for row in rows]

    def document(self, owner: str, base_id: int, document_id: int) -> dict[str, Any]:
        found = [d for d in self.documents(owner, base_id) if d["id"] == document_id]
        if not found:
            raise NotFound(f"No document {document_id} in this knowledge base.")
        return found[0]

    def original(self, owner: str | None, base_id: int, document_id: int) -> tuple[str, str, bytes]:
        """(name, kind, bytes) of a document as it was uploaded; ``owner`` None: the base is one a personality
        shares with everyone (the caller checked)."""
        if owner is not None:
            self.document(owner, base_id, document_id)
        self._open()
        with self._lock:
            rows = self._db.rows("select name, kind, original from knowledge_documents where id = ? and base_id = ?",
                                 (document_id, base_id))
        if not rows:
            raise NotFound(f"No document {document_id} in this knowledge base.")
        name, kind, data = rows[0]
        return name, kind, bytes(data)

    def delete_document(self, owner: str, base_id: int, document_id: int) -> None:
        self.document(owner, base_id, document_id)
        with self._transaction():
            self._forget_passages("document_id = ?", (document_id,))
            self._db.rows("delete from knowledge_documents where id = ?", (document_id,))

    def reindex(self, owner: str, base_id: int, document_id: int) -> dict[str, Any]:
        """Read the kept original again (after an upgrade of a reader or the chunking) and replace its passages."""
        name, _, data = self.original(owner, base_id, document_id)
        kind, passages, pages = read(name, data, self.limits)
        vectors = self._vectors([passage.text for passage in passages])
        with self._transaction():
            self._forget_passages("document_id = ?", (document_id,))
            self._index(document_id, base_id, passages, vectors)
            self._db.rows("update knowledge_documents set kind = ?, pages = ?, passages = ? where id = ?",
                          (kind, pages, len(passages), document_id))
        return self.document(owner, base_id, document_id)

    # ----- search ----------------------------------------------------------------------------------------

    def search(self, base_ids: Sequence[int], question: str, limit: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The passages of these bases that best answer ``question``, best first; ``mode``: ``hybrid``,
        ``bm25`` or ``vector`` (the last two for evaluation)."""
        base_ids = sorted(set(base_ids))
        words = sorted({word.lower() for word in _WORD.findall(question)})
        if not base_ids or not words:
            return []
        self._open()
        vector = self._vectors([question])[0] if mode in ("hybrid", "vector") and self._dimensions else None
        rankings = []
        with self._lock:
            if mode in ("hybrid", "bm25"):
                rankings.append(self._db.full_text(base_ids, words, CANDIDATES))
            if vector is not None:
                rankings.append(self._db.nearest(base_ids, vector, CANDIDATES))
            scores: dict[int, float] = {}
            for ranking in rankings:
                for rank, passage_id in enumerate(ranking, 1):
                    scores[passage_id] = scores.get(passage_id, 0.0) + 1.0 / (RRF_K + rank)
            best = sorted(scores, key=lambda pid: (-scores[pid], pid))[:limit]
            if not best:
                return []
            marks = ",".join("?" * len(best))
            rows = {row[0]: row for row in self._db.rows(
                f"select p.id, b.id, b.name, d.id, d.name, p.location, p.text from knowledge_passages p "
                f"join knowledge_documents d on d.id = p.document_id join knowledge_bases b on b.id = p.base_id "
                f"where p.id in ({marks})", best)}
        return [Hit(*rows[pid][1:], score=scores[pid]) for pid in best if pid in rows]


def _base(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "created": row[2], "documents": row[3], "bytes": row[4],
            "passages": row[5]}


def _document(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "kind": row[2], "bytes": row[3], "pages": row[4], "passages": row[5],
            "created": row[6], "sha256": row[7], "status": "indexed"}
