"""Where knowledge bases are kept: SQLite (one file, the default) or PostgreSQL (shared by replicas), each with
indexes made for the job. ``llm.knowledge.index`` writes its queries once, with ``?`` placeholders and the
``knowledge_*`` tables; a backend runs them, and owns what differs: the schema, the full-text index and the
vector index.

* SQLite, through ``sqlean.py`` (a current SQLite that can load extensions; Python's own ``sqlite3`` is often
  built without, as this project's CI Python is): an FTS5 table (Porter stemming, ``bm25()`` ranking) and a
  sqlite-vec ``vec0`` table partitioned by base (cosine distance) beside the passages.
* PostgreSQL, through psycopg: a ``tsvector`` column with a GIN index (ranked by the inverse document frequency
  of the words each passage holds, then ``ts_rank_cd``) and a ``cube``
  column with a GiST index searched nearest-first (``<->``). ``cube`` ships with PostgreSQL itself (contrib);
  pgvector would be the first choice but is not in Debian 12's archive. A cube holds at most 100 dimensions, so
  vectors there are the embedding's first 64 (WordLlama is trained so that its leading dimensions stand alone);
  on unit vectors Euclidean order is cosine order. Schema changes take an advisory lock, so replicas starting
  together take turns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TABLES = """
create table if not exists knowledge_meta (key text primary key, value text not null);
create table if not exists knowledge_bases (
    id {serial} primary key, owner text not null, name text not null, created double precision not null,
    unique (owner, name));
create table if not exists knowledge_documents (
    id {serial} primary key, base_id bigint not null references knowledge_bases(id) on delete cascade,
    name text not null, kind text not null, bytes bigint not null, sha256 text not null, pages integer not null,
    passages integer not null, original {blob} not null, created double precision not null);
create table if not exists knowledge_passages (
    id {serial} primary key, document_id bigint not null references knowledge_documents(id) on delete cascade,
    base_id bigint not null, location text not null, text text not null{extra});
create index if not exists knowledge_passages_document on knowledge_passages(document_id);
create index if not exists knowledge_passages_base on knowledge_passages(base_id);
"""


class SqliteBackend:
    """One SQLite file (or ``:memory:``)."""

    max_dimensions = None

    def __init__(self, path: str):
        import sqlean
        import sqlite_vec

        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.integrity_error = sqlean.IntegrityError
        self._db = sqlean.connect(path, check_same_thread=False, isolation_level=None)
        self._db.enable_load_extension(True)
        sqlite_vec.load(self._db)
        self._db.enable_load_extension(False)
        self._db.execute("pragma foreign_keys = on")
        self._db.execute("pragma busy_timeout = 10000")
        if path != ":memory:":
            self._db.execute("pragma journal_mode = wal")
        self._db.executescript(TABLES.format(serial="integer", blob="blob", extra="") +
                               "create virtual table if not exists knowledge_passages_text using fts5(text, "
                               "content='', contentless_delete=1, tokenize='porter unicode61');")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("begin")
        try:
            yield
        except BaseException:
            self._db.execute("rollback")
            raise
        self._db.execute("commit")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        return self._db.execute(sql, params).lastrowid

    def reset_vectors(self, dimensions: int) -> None:
        self._db.execute("drop table if exists knowledge_passages_vectors")
        self._db.execute(f"create virtual table knowledge_passages_vectors using vec0(passage_id integer primary "
                         f"key, base_id integer partition key, embedding float[{dimensions}] distance_metric=cosine)")

    def add_text(self, passage_id: int, text: str) -> None:
        self._db.execute("insert into knowledge_passages_text(rowid, text) values (?, ?)", (passage_id, text))

    def add_vectors(self, rows: Sequence[tuple[int, int, np.ndarray]]) -> None:
        self._db.executemany("insert into knowledge_passages_vectors(passage_id, base_id, embedding) values "
                             "(?, ?, ?)", [(pid, bid, vector.tobytes()) for pid, bid, vector in rows])

    def forget(self, ids: Sequence[int], vectors: bool) -> None:
        marks = ",".join("?" * len(ids))
        self._db.execute(f"delete from knowledge_passages_text where rowid in ({marks})", ids)
        if vectors:
            self._db.execute(f"delete from knowledge_passages_vectors where passage_id in ({marks})", ids)

    def full_text(self, base_ids: Sequence[int], words: Sequence[str], limit: int) -> list[int]:
        marks = ",".join("?" * len(base_ids))
        return [row[0] for row in self._db.execute(
            f"select t.rowid from knowledge_passages_text t join knowledge_passages p on p.id = t.rowid "
            f"where knowledge_passages_text match ? and p.base_id in ({marks}) order by bm25(knowledge_passages_text) "
            f"limit ?", (" OR ".join(f'"{word}"' for word in words), *base_ids, limit)).fetchall()]

    def nearest(self, base_ids: Sequence[int], vector: np.ndarray, limit: int) -> list[int]:
        found: list[tuple[float, int]] = []
        for base_id in base_ids:  # the partition key narrows each k-nearest search to one base
            found += [(distance, pid) for pid, distance in self._db.execute(
                "select passage_id, distance from knowledge_passages_vectors where embedding match ? and k = ? "
                "and base_id = ?", (vector.tobytes(), limit, base_id)).fetchall()]
        return [pid for _, pid in sorted(found)[:limit]]

    def close(self) -> None:
        self._db.close()


class PostgresBackend:
    """A PostgreSQL database (the conversations' own, ``DATABASE_URL``), through a small connection pool like the
    conversation store's: a connection lost with a server restart is replaced, and none is left open for the
    garbage collector to find."""

    max_dimensions = 64  # cube's limit is 100; WordLlama's first 64 dimensions stand alone

    def __init__(self, url: str):
        import psycopg
        from psycopg_pool import ConnectionPool

        self.integrity_error = psycopg.errors.UniqueViolation
        self._pool = ConnectionPool(url, min_size=1, max_size=2, open=True, kwargs={"autocommit": True})
        self._held: Any = None  # the connection of the transaction in progress
        with self.transaction(), self._connection() as db:
            db.execute("select pg_advisory_xact_lock(hashtext('llm-knowledge-schema'))")
            db.execute("create extension if not exists cube")
            for statement in filter(str.strip, TABLES.format(
                    serial="bigserial", blob="bytea", extra=", words tsvector, embedding cube").split(";")):
                db.execute(statement)
            db.execute("create index if not exists knowledge_passages_words on knowledge_passages using gin (words)")
            db.execute("create index if not exists knowledge_passages_embedding on knowledge_passages "
                       "using gist (embedding)")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """The transaction's connection, else one from the pool (the index's lock serialises every call)."""
        if self._held is not None:
            yield self._held
        else:
            with self._pool.connection() as db:
                yield db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._pool.connection() as db, db.transaction():
            self._held = db
            try:
                yield
            finally:
                self._held = None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._connection() as db:
            cursor = db.execute(_pg(sql), params)
            return cursor.fetchall() if cursor.description else []

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        with self._connection() as db:
            return db.execute(_pg(sql) + " returning id", params).fetchone()[0]

    def reset_vectors(self, dimensions: int) -> None:
        self.rows("update knowledge_passages set embedding = null")

    def add_text(self, passage_id: int, text: str) -> None:
        self.rows("update knowledge_passages set words = to_tsvector('english', ?) where id = ?", (text, passage_id))

    def add_vectors(self, rows: Sequence[tuple[int, int, np.ndarray]]) -> None:
        with self._connection() as db, db.cursor() as cursor:
            cursor.executemany("update knowledge_passages set embedding = cube(%s::float8[]) where id = %s",
                               [(vector.astype(float).tolist(), pid) for pid, _, vector in rows])

    def forget(self, ids: Sequence[int], vectors: bool) -> None:
        """The indexes live in the passages' own columns: deleting the rows is enough."""

    def full_text(self, base_ids: Sequence[int], words: Sequence[str], limit: int) -> list[int]:
        """Passages holding any of the words, ranked by the summed inverse document frequency of those they hold
        (``ts_rank_cd`` alone knows no document frequency: among many passages, common words would win), then by
        ``ts_rank_cd``. Each word's frequency is one count on the GIN index."""
        ids = list(base_ids)
        with self._connection() as db:
            total = db.execute("select count(*) from knowledge_passages where base_id = any(%s)", (ids,)).fetchone()[0]
            weighted = []
            for word in words:  # \w+ only: nothing to escape; stop words give an empty query and are skipped
                frequency = db.execute(
                    "select count(*) from knowledge_passages where base_id = any(%s) and "
                    "words @@ plainto_tsquery('english', %s)", (ids, word)).fetchone()[0]
                if frequency:
                    weighted.append((word, math.log(1 + (total - frequency + 0.5) / (frequency + 0.5))))
            if not weighted:
                return []
            query = " | ".join(word for word, _ in weighted)
            score = " + ".join("%s * (words @@ plainto_tsquery('english', %s))::int" for _ in weighted)
            return [row[0] for row in db.execute(
                f"select id from knowledge_passages where base_id = any(%s) and words @@ to_tsquery('english', %s) "
                f"order by ({score}) desc, ts_rank_cd(words, to_tsquery('english', %s)) desc, id limit %s",
                (ids, query, *[value for word, idf in weighted for value in (idf, word)], query, limit)).fetchall()]

    def nearest(self, base_ids: Sequence[int], vector: np.ndarray, limit: int) -> list[int]:
        return [row[0] for row in self.rows(
            "select id from knowledge_passages where base_id = any(?) and embedding is not null "
            "order by embedding <-> cube(?::float8[]) limit ?", (list(base_ids), vector.astype(float).tolist(), limit))]

    def close(self) -> None:
        self._pool.close()


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def is_postgres(location: str | None) -> bool:
    return (location or "").startswith(("postgresql://", "postgres://"))


def open_backend(location: str) -> SqliteBackend | PostgresBackend:
    """A PostgreSQL URL, else a SQLite file path."""
    return PostgresBackend(location) if is_postgres(location) else SqliteBackend(location)
