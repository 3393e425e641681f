"""Knowledge bases in SQLite: bases, documents (with their original bytes, for download and re-indexing),
passages, and two indexes over the passages made for the job:

* full text: an FTS5 table (Porter stemming over Unicode words), ranked by SQLite's own ``bm25()``;
* vectors: a ``vec0`` table from sqlite-vec, partitioned by base, holding each passage's embedding (the
  service's embedding model, WordLlama by default), searched by its k-nearest-neighbour query.

A question is searched both ways and the two rankings are fused by reciprocal rank (each passage scores
``1 / (60 + rank)`` per ranking it appears in), which needs no calibration between BM25 scores and cosine
distances. Python's own ``sqlite3`` may be built without extension loading (this project's CI Python is), so
the store uses ``sqlean.py``: the same DB-API over a current SQLite that loads extensions.

Every call names the user; a base is only ever read or changed by its owner, except that a personality may
name ``owner/base`` in its file to search it for everyone who talks to it (read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlean
import sqlite_vec

from llm.errors import BadRequest, FileTooLarge, NotFound
from llm.knowledge.documents import Limits, read

RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_WORD = re.compile(r"\w+", re.UNICODE)

SCHEMA = """
create table if not exists meta (key text primary key, value text not null);
create table if not exists bases (
    id integer primary key, owner text not null, name text not null, created real not null,
    unique (owner, name));
create table if not exists documents (
    id integer primary key, base_id integer not null references bases(id) on delete cascade,
    name text not null, kind text not null, bytes integer not null, sha256 text not null, pages integer not null,
    passages integer not null, original blob not null, created real not null);
create table if not exists passages (
    id integer primary key, document_id integer not null references documents(id) on delete cascade,
    base_id integer not null, location text not null, text text not null);
create index if not exists passages_document on passages(document_id);
create virtual table if not exists passages_text using fts5(text, content='', contentless_delete=1,
    tokenize='porter unicode61');
"""


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
    """The knowledge store of one service (one SQLite file); safe to share between threads."""

    def __init__(self, path: str, embeddings: Any = None, limits: Limits | None = None, quota_bytes: int = 0):
        """``embeddings``: the service's embedding model (``llm.engine.embeddings.Embeddings``), or None for
        full-text search only (a change of model re-embeds every passage); ``quota_bytes``: what one user's
        documents may weigh (0: no limit). The file is opened on first use: most requests never touch it."""
        self.path, self.limits, self.quota_bytes = path, limits or Limits(), quota_bytes
        self._embeddings = embeddings if embeddings is not None and embeddings.enabled else None
        self._lock = threading.RLock()
        self._db: Any = None
        self._dimensions = 0

    def _open(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlean.connect(self.path, check_same_thread=False, isolation_level=None)
            db.enable_load_extension(True)
            sqlite_vec.load(db)
            db.enable_load_extension(False)
            db.execute("pragma foreign_keys = on")
            db.execute("pragma busy_timeout = 10000")
            if self.path != ":memory:":
                db.execute("pragma journal_mode = wal")
            db.executescript(SCHEMA)
            self._db = db
            self._dimensions = self._vectors_ready() if self._embeddings is not None else 0

    # ----- set-up ----------------------------------------------------------------------------------------

    def _vectors_ready(self) -> int:
        """The vector table for the current embedding model; made again (and every passage embedded again)
        when the model changed since the last start."""
        probe = self._embed(["probe"])
        dimensions, model = probe.shape[1], f"{self._embeddings.name}/{probe.shape[1]}"
        with self._lock:
            row = self._db.execute("select value from meta where key = 'embeddings'").fetchone()
            if row is not None and row[0] == model:
                return dimensions
            self._db.execute("drop table if exists passages_vectors")
            self._db.execute(f"create virtual table passages_vectors using vec0(passage_id integer primary key, "
                             f"base_id integer partition key, embedding float[{dimensions}] distance_metric=cosine)")
            rows = self._db.execute("select id, base_id, text from passages").fetchall()
            self._store_vectors(rows)
            self._db.execute("insert or replace into meta values ('embeddings', ?)", (model,))
        return dimensions

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._embeddings.create(texts)[0], dtype=np.float32)

    def _store_vectors(self, rows: Sequence[tuple[int, int, str]]) -> None:
        for start in range(0, len(rows), 256):
            batch = rows[start:start + 256]
            vectors = self._embed([text for _, _, text in batch])
            self._db.executemany("insert into passages_vectors(passage_id, base_id, embedding) values (?, ?, ?)",
                                 [(pid, bid, vector.tobytes()) for (pid, bid, _), vector in zip(batch, vectors,
                                                                                                strict=True)])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All of it or nothing, under the lock."""
        with self._lock:
            self._db.execute("begin")
            try:
                yield
            except BaseException:
                self._db.execute("rollback")
                raise
            self._db.execute("commit")

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
        with self._lock:
            try:
                cursor = self._db.execute("insert into bases(owner, name, created) values (?, ?, ?)",
                                          (owner, name, time.time()))
            except sqlean.IntegrityError:
                raise BadRequest(f"You already have a knowledge base named {name!r}.", param="name") from None
            return self.base(owner, cursor.lastrowid)

    def bases(self, owner: str) -> list[dict[str, Any]]:
        self._open()
        with self._lock:
            rows = self._db.execute(
                "select b.id, b.name, b.created, count(d.id), coalesce(sum(d.bytes), 0), coalesce(sum(d.passages), 0) "
                "from bases b left join documents d on d.base_id = b.id where b.owner = ? group by b.id "
                "order by b.name", (owner,)).fetchall()
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
            self._db.execute("delete from bases where id = ?", (base_id,))

    def searchable(self, owner: str | None, shared: Sequence[str] = ()) -> list[int]:
        """The bases a question of ``owner`` (None: a user without an identity of their own) searches: their own
        and those a personality shares; nothing (and no file opened, no model loaded) while no base exists."""
        if self._db is None and (self.path == ":memory:" or not Path(self.path).exists()):
            return []
        ids = [base["id"] for base in self.bases(owner)] if owner else []
        return ids + [base_id for base_id in map(self.shared, shared) if base_id is not None]

    def shared(self, reference: str) -> int | None:
        """The id of the base a personality names as ``owner/name``, or None if there is none (yet)."""
        owner, _, name = reference.partition("/")
        self._open()
        with self._lock:
            row = self._db.execute("select id from bases where owner = ? and name = ?", (owner, name)).fetchone()
        return row[0] if row else None

    # ----- documents -------------------------------------------------------------------------------------

    def add_document(self, owner: str, base_id: int, name: str, data: bytes) -> dict[str, Any]:
        """Read, index and keep one upload; the whole document or nothing."""
        self.base(owner, base_id)
        name = Path(name or "document").name[:200] or "document"
        if self.quota_bytes:
            with self._lock:
                used = self._db.execute("select coalesce(sum(d.bytes), 0) from documents d join bases b on "
                                        "b.id = d.base_id where b.owner = ?", (owner,)).fetchone()[0]
            if used + len(data) > self.quota_bytes:
                raise FileTooLarge(f"{name} would bring your documents to {used + len(data)} bytes; each user may "
                                   f"keep {self.quota_bytes}.")
        kind, passages, pages = read(name, data, self.limits)
        with self._transaction():
            cursor = self._db.execute(
                "insert into documents(base_id, name, kind, bytes, sha256, pages, passages, original, created) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?)", (base_id, name, kind, len(data),
                                                       hashlib.sha256(data).hexdigest(), pages, len(passages),
                                                       data, time.time()))
            self._index(cursor.lastrowid, base_id, passages)
        return self.document(owner, base_id, cursor.lastrowid)

    def _index(self, document_id: int, base_id: int, passages) -> None:
        rows = []
        for passage in passages:
            cursor = self._db.execute("insert into passages(document_id, base_id, location, text) values (?, ?, ?, ?)",
                                      (document_id, base_id, passage.location, passage.text))
            self._db.execute("insert into passages_text(rowid, text) values (?, ?)",
                             (cursor.lastrowid, f"{passage.location}\n{passage.text}"))
            rows.append((cursor.lastrowid, base_id, passage.text))
        if self._dimensions:
            self._store_vectors(rows)

    def _forget_passages(self, where: str, params: tuple) -> None:
        ids = [row[0] for row in self._db.execute(f"select id from passages where {where}", params).fetchall()]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"delete from passages_text where rowid in ({marks})", chunk)
            if self._dimensions:
                self._db.execute(f"delete from passages_vectors where passage_id in ({marks})", chunk)
        self._db.execute(f"delete from passages where {where}", params)

    def documents(self, owner: str, base_id: int) -> list[dict[str, Any]]:
        self.base(owner, base_id)
        with self._lock:
            rows = self._db.execute("select id, name, kind, bytes, pages, passages, created, sha256 from documents "
                                    "where base_id = ? order by id", (base_id,)).fetchall()
        return [_document(row) for row in rows]

    def document(self, owner: str, base_id: int, document_id: int) -> dict[str, Any]:
        found = [d for d in self.documents(owner, base_id) if d["id"] == document_id]
        if not found:
            raise NotFound(f"No document {document_id} in this knowledge base.")
        return found[0]

    def original(self, owner: str, base_id: int, document_id: int) -> tuple[str, str, bytes]:
        """(name, kind, bytes) of a document as it was uploaded."""
        self.document(owner, base_id, document_id)
        with self._lock:
            return self._db.execute("select name, kind, original from documents where id = ?",
                                    (document_id,)).fetchone()

    def delete_document(self, owner: str, base_id: int, document_id: int) -> None:
        self.document(owner, base_id, document_id)
        with self._transaction():
            self._forget_passages("document_id = ?", (document_id,))
            self._db.execute("delete from documents where id = ?", (document_id,))

    def reindex(self, owner: str, base_id: int, document_id: int) -> dict[str, Any]:
        """Read the kept original again (after an upgrade of a reader or the chunking) and replace its passages."""
        name, _, data = self.original(owner, base_id, document_id)
        kind, passages, pages = read(name, data, self.limits)
        with self._transaction():
            self._forget_passages("document_id = ?", (document_id,))
            self._index(document_id, base_id, passages)
            self._db.execute("update documents set kind = ?, pages = ?, passages = ? where id = ?",
                             (kind, pages, len(passages), document_id))
        return self.document(owner, base_id, document_id)

    # ----- search ----------------------------------------------------------------------------------------

    def search(self, base_ids: Sequence[int], question: str, limit: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The passages of these bases that best answer ``question``, best first; ``mode``: ``hybrid``,
        ``bm25`` or ``vector`` (the last two for evaluation)."""
        base_ids = sorted(set(base_ids))
        if not base_ids or not question.strip():
            return []
        rankings = []
        self._open()
        with self._lock:
            if mode in ("hybrid", "bm25"):
                rankings.append(self._full_text(base_ids, question))
            if mode in ("hybrid", "vector") and self._dimensions:
                rankings.append(self._nearest(base_ids, question))
            scores: dict[int, float] = {}
            for ranking in rankings:
                for rank, passage_id in enumerate(ranking, 1):
                    scores[passage_id] = scores.get(passage_id, 0.0) + 1.0 / (RRF_K + rank)
            best = sorted(scores, key=lambda pid: (-scores[pid], pid))[:limit]
            if not best:
                return []
            marks = ",".join("?" * len(best))
            rows = {row[0]: row for row in self._db.execute(
                f"select p.id, b.id, b.name, d.id, d.name, p.location, p.text from passages p "
                f"join documents d on d.id = p.document_id join bases b on b.id = p.base_id where p.id in ({marks})",
                best).fetchall()}
        return [Hit(*rows[pid][1:], score=scores[pid]) for pid in best if pid in rows]

    def _full_text(self, base_ids: Sequence[int], question: str) -> list[int]:
        words = {word.lower() for word in _WORD.findall(question)}
        if not words:
            return []
        query = " OR ".join(f'"{word}"' for word in sorted(words))
        marks = ",".join("?" * len(base_ids))
        rows = self._db.execute(
            f"select t.rowid from passages_text t join passages p on p.id = t.rowid where passages_text match ? "
            f"and p.base_id in ({marks}) order by bm25(passages_text) limit ?",
            (query, *base_ids, CANDIDATES)).fetchall()
        return [row[0] for row in rows]

    def _nearest(self, base_ids: Sequence[int], question: str) -> list[int]:
        vector = self._embed([question])[0].tobytes()
        found: list[tuple[float, int]] = []
        for base_id in base_ids:  # the partition key narrows each k-nearest search to one base
            found += [(distance, pid) for pid, distance in self._db.execute(
                "select passage_id, distance from passages_vectors where embedding match ? and k = ? "
                "and base_id = ?", (vector, CANDIDATES, base_id)).fetchall()]
        return [pid for _, pid in sorted(found)[:CANDIDATES]]


def _base(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "created": row[2], "documents": row[3], "bytes": row[4],
            "passages": row[5]}


def _document(row: tuple) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "kind": row[2], "bytes": row[3], "pages": row[4], "passages": row[5],
            "created": row[6], "sha256": row[7], "status": "indexed"}
