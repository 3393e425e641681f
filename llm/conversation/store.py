"""The conversation store: SQLite by default, PostgreSQL when ``DATABASE_URL=postgresql://...``.

Conversations outlive restarts and can be shared by several replicas (with PostgreSQL). Every turn re-reads
the conversation from the database, so a turn that lands on another replica continues correctly (it only
loses the engine cache). The schema is created and migrated by the service itself; each user sees only
their own conversations, and another user's conversation is reported as unknown rather than forbidden, so
ids cannot be probed.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llm.conversation.turns import Conversation, Turn, check_id, title_of
from llm.errors import BadRequest, ConfigError, NotFound, ServiceError

# Each entry migrates the schema from version i to i + 1. Never edit a released entry: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY, personality TEXT NOT NULL, user_id TEXT NOT NULL, title TEXT NOT NULL DEFAULT '',
            created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
            first_kept INTEGER NOT NULL DEFAULT 0, summary TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX conversations_user ON conversations (user_id, updated)",
        """CREATE TABLE messages (
            id {serial} PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, display TEXT,
            prompt_tokens INTEGER, completion_tokens INTEGER, time_to_first_token DOUBLE PRECISION,
            tokens_per_second DOUBLE PRECISION, sources TEXT NOT NULL DEFAULT '[]',
            trimmed BOOLEAN NOT NULL DEFAULT FALSE, rating INTEGER, feedback_comment TEXT, feedback_at DOUBLE PRECISION,
            created DOUBLE PRECISION NOT NULL, UNIQUE (conversation_id, position))""",
    ),
    (  # ids are scoped per user: "id" is internal, "client_id" what the owner calls it (unique per owner)
        "ALTER TABLE conversations ADD COLUMN client_id TEXT",
        "UPDATE conversations SET client_id = id",
        "CREATE UNIQUE INDEX conversations_owner_id ON conversations (user_id, client_id)",
    ),
    (  # messages form a tree (edits and regenerations are siblings); the visible path follows, from each
        # message, the child chosen most recently. "position" is now the order of insertion, not of the path.
        "ALTER TABLE messages ADD COLUMN parent_id INTEGER",
        "ALTER TABLE messages ADD COLUMN chosen DOUBLE PRECISION",
        "UPDATE messages SET chosen = created, parent_id = (SELECT p.id FROM messages p WHERE "
        "p.conversation_id = messages.conversation_id AND p.position = messages.position - 1)",
    ),
)
LAST = object()  # append's default parent: the last turn of the conversation's path

log = logging.getLogger(__name__)


MAX_IDLE_CONNECTIONS = 8  # SQLite connections kept open between transactions (one per concurrent transaction)


class QuotaExceeded(ServiceError):
    status = 403
    type = "quota_exceeded"


class _Database:
    """A DB-API connection source with one SQL dialect: queries are written with ``?`` placeholders."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith(("postgresql://", "postgres://")):
            self.kind, self.serial = "postgresql", "BIGSERIAL"
            try:
                from psycopg_pool import ConnectionPool
            except ImportError:
                raise ConfigError("DATABASE_URL is PostgreSQL but psycopg is not installed") from None
            self._pool = ConnectionPool(url, min_size=1, max_size=8, open=True, kwargs={"autocommit": False})
        elif url.startswith("sqlite:///"):
            self.kind, self.serial = "sqlite", "INTEGER"
            self.path = Path(url[len("sqlite:///"):]).expanduser()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._idle: list[sqlite3.Connection] = []  # open connections between transactions
            self._lock = threading.Lock()
        else:
            raise ConfigError(f"DATABASE_URL: unsupported URL {url!r} (use sqlite:///path or postgresql://...)")

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed on success."""
        if self.kind == "postgresql":
            with self._pool.connection() as conn, conn.cursor() as cursor:
                yield _Cursor(cursor, "%s")
            return
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield _Cursor(conn.cursor(), "?")
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                conn.close()  # in a state nobody knows: not reused
                raise
            self._release(conn)
            raise
        self._release(conn)

    def _connection(self) -> sqlite3.Connection:
        """An open connection, kept from an earlier transaction when one is idle.

        A connection per transaction cost 1.7 ms of CPU for a turn's read and write against 0.3 ms reused (and
        the last connection to close checkpoints and deletes the WAL, every time): opening parses the schema
        and recreates the WAL. Each is used by one thread at a time."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable at each checkpoint, never corrupt
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        if self.kind == "postgresql":
            self._pool.close()
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Cursor:
    """Translates ``?`` placeholders to the driver's."""

    def __init__(self, cursor, placeholder: str):
        self.cursor, self.placeholder = cursor, placeholder

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        self.cursor.execute(sql.replace("?", self.placeholder), tuple(params))
        return self

    def one(self) -> tuple | None:
        return self.cursor.fetchone()

    def all(self) -> list[tuple]:
        return self.cursor.fetchall()


class SqlConversationStore:
    """Conversations and messages in SQLite or PostgreSQL."""

    def __init__(self, url: str, max_conversations_per_user: int = 0):
        self.db = _Database(url)
        self.max_conversations = max_conversations_per_user
        if self.db.kind == "sqlite":  # readers never block the writer; a crash mid-write loses nothing committed
            connection = sqlite3.connect(self.db.path, timeout=30)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.close()
        self._migrate()

    def _migrate(self) -> None:
        with self.db.transaction() as cur:
            if self.db.kind == "postgresql":  # replicas starting together migrate one at a time
                cur.execute("SELECT pg_advisory_xact_lock(724815)")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").one()
            version = row[0] if row else 0
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    cur.execute(statement.format(serial=self.db.serial))
            cur.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def close(self) -> None:
        self.db.close()

    # ----- conversations ---------------------------------------------------------------------------------

    def open(self, conversation_id: str | None, personality: str, user: str = "anonymous") -> Conversation:
        """The user's conversation with this id, read fresh; a new one (a random id when None) is only stored with
        its first turn. Another user's conversation of the same id is a different conversation."""
        client_id = check_id(conversation_id) if conversation_id is not None else uuid.uuid4().hex
        with self.db.transaction() as cur:
            row = cur.execute("SELECT id, personality FROM conversations WHERE user_id = ? AND client_id = ?",
                              (user, client_id)).one()
            if row is None:
                self._check_quota(cur, user)
                return Conversation(client_id, personality, user=user, key=uuid.uuid4().hex, stored=False)
            if row[1] != personality:
                raise BadRequest(f"Conversation '{client_id}' belongs to personality '{row[1]}', "
                                 f"not '{personality}'.")
            return self._load(cur, row[0])

    def _check_quota(self, cur, user: str) -> None:
        if not self.max_conversations:
            return
        count = cur.execute("SELECT COUNT(*) FROM conversations WHERE user_id = ?", (user,)).one()[0]
        if count >= self.max_conversations:
            raise QuotaExceeded(f"You have {count} conversations, the most this service keeps per user "
                                "(LLM_MAX_CONVERSATIONS_PER_USER); delete some to start new ones.")

    def get(self, conversation_id: str, user: str = "anonymous") -> Conversation:
        with self.db.transaction() as cur:
            return self._load(cur, self._owned(cur, conversation_id, user))

    def _owned(self, cur, conversation_id: str, user: str) -> str:
        """The internal id of the user's conversation; 404 for anyone else's, exactly as for none at all."""
        row = cur.execute("SELECT id FROM conversations WHERE user_id = ? AND client_id = ?",
                          (user, conversation_id)).one()
        if row is None:
            raise NotFound(f"Unknown conversation '{conversation_id}'.")
        return row[0]

    def _load(self, cur, key: str) -> Conversation:
        row = cur.execute("SELECT personality, user_id, title, created, updated, first_kept, summary, client_id "
                          "FROM conversations WHERE id = ?", (key,)).one()
        rows = cur.execute("SELECT id, parent_id, chosen, role, content, display, sources, rating, feedback_comment "
                           "FROM messages WHERE conversation_id = ? ORDER BY position", (key,)).all()
        return Conversation(row[7], row[0], turns=_path(rows), first_kept=row[5], summary=row[6], created=row[3],
                            updated=row[4], user=row[1], title=row[2], key=key)

    def _create(self, cur, conversation: Conversation, now: float) -> None:
        """Store a new conversation with its first turn; if the same user created it meanwhile, join that one."""
        cur.execute("INSERT INTO conversations (id, client_id, personality, user_id, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, client_id) DO NOTHING",
                    (conversation.key, conversation.id, conversation.personality, conversation.user, now, now))
        conversation.key = cur.execute("SELECT id FROM conversations WHERE user_id = ? AND client_id = ?",
                                       (conversation.user, conversation.id)).one()[0]
        conversation.stored = True

    def append(self, conversation: Conversation, turns: Sequence[Turn], usage: dict[str, Any] | None = None,
               parent: Any = LAST) -> None:
        """Add turns (with the assistant's usage figures) and the conversation's trimming state. They continue
        ``parent`` (a message id; None: the first turn; by default the last turn of the conversation's path), so
        an edited question or a regenerated answer becomes a sibling of the one it replaces, and the path."""
        usage = usage or {}
        now = time.time()
        if parent is LAST:
            parent = conversation.turns[-1].message_id if conversation.turns else None
        with self.db.transaction() as cur:
            if not conversation.stored:
                self._create(cur, conversation, now)
            if self.db.kind == "postgresql":
                cur.execute("SELECT id FROM conversations WHERE id = ? FOR UPDATE", (conversation.key,))
            row = cur.execute("SELECT COALESCE(MAX(position), -1) FROM messages WHERE conversation_id = ?",
                              (conversation.key,)).one()
            position = row[0] + 1
            for turn in turns:
                figures = usage if turn.role == "assistant" else {}
                row = cur.execute(
                    "INSERT INTO messages (conversation_id, position, parent_id, chosen, role, content, display, "
                    "prompt_tokens, completion_tokens, time_to_first_token, tokens_per_second, sources, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (conversation.key, position, parent, now, turn.role, turn.content, turn.display,
                     figures.get("prompt_tokens"), figures.get("completion_tokens"),
                     figures.get("time_to_first_token"), figures.get("tokens_per_second"),
                     json.dumps(turn.sources), now)).one()
                turn.message_id = parent = row[0]
                position += 1
            title = conversation.title or self._title(turns)
            cur.execute("UPDATE conversations SET updated = ?, first_kept = ?, summary = ?, title = ? WHERE id = ?",
                        (now, conversation.first_kept, conversation.summary, title, conversation.key))
            trimmed = [turn.message_id for turn in conversation.turns[:conversation.first_kept]]
            if trimmed:
                cur.execute(f"UPDATE messages SET trimmed = TRUE WHERE id IN ({', '.join('?' * len(trimmed))})",
                            trimmed)
        conversation.updated, conversation.title = now, title

    def choose(self, conversation_id: str, user: str, message_id: int) -> Conversation:
        """Show another variant: the path goes through ``message_id`` (and on through what was last chosen below
        it). Turns trimmed from the model's context on the old path stay trimmed only where the paths agree."""
        with self.db.transaction() as cur:
            key = self._owned(cur, conversation_id, user)
            before = self._load(cur, key)
            parents = dict(cur.execute("SELECT id, parent_id FROM messages WHERE conversation_id = ?", (key,)).all())
            if message_id not in parents:
                raise NotFound(f"Unknown message {message_id} in conversation '{conversation_id}'.")
            chain, ident, now = [], message_id, time.time()
            while ident is not None:
                chain.append(ident)
                ident = parents[ident]
            cur.execute(f"UPDATE messages SET chosen = ? WHERE id IN ({', '.join('?' * len(chain))})", (now, *chain))
            after = self._load(cur, key)
            shared = next((i for i, (a, b) in enumerate(zip(before.turns, after.turns, strict=False))
                           if a.message_id != b.message_id), min(len(before.turns), len(after.turns)))
            if shared < after.first_kept:  # the summary and the trimming were of turns no longer shown
                after.first_kept, after.summary = min(after.first_kept, shared), ""
                cur.execute("UPDATE conversations SET first_kept = ?, summary = ? WHERE id = ?",
                            (after.first_kept, "", key))
        return after

    @staticmethod
    def _title(turns: Sequence[Turn]) -> str:
        """For turns stored without a title chosen by the chat service: the first question as typed."""
        first = next((turn for turn in turns if turn.role == "user"), None)
        return title_of((first.display or first.content) if first else "")

    def list(self, user: str, limit: int = 20, offset: int = 0, query: str = "") -> list[dict[str, Any]]:
        """The user's conversations with at least one message, most recently updated first; with ``query``, only
        those whose title or any message (as its author saw it) contains it, ignoring case (a scan of the user's
        own rows, which the per-user quota bounds)."""
        search, params = "", [user]
        if query:
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", query.lower()) + "%"
            search = ("AND (LOWER(c.title) LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages s WHERE "
                      "s.conversation_id = c.id AND LOWER(COALESCE(s.display, s.content)) LIKE ? ESCAPE '\\')) ")
            params += [pattern, pattern]
        with self.db.transaction() as cur:
            rows = cur.execute(
                "SELECT c.client_id, c.personality, c.title, c.created, c.updated, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) "
                "FROM conversations c WHERE c.user_id = ? "
                "AND EXISTS (SELECT 1 FROM messages e WHERE e.conversation_id = c.id) " + search +
                "ORDER BY c.updated DESC, c.id LIMIT ? OFFSET ?",
                (*params, limit, offset)).all()
        return [{"id": r[0], "personality": r[1], "title": r[2], "created": r[3], "updated": r[4], "messages": r[5]}
                for r in rows]

    def rename(self, conversation_id: str, user: str, title: str) -> None:
        with self.db.transaction() as cur:
            key = self._owned(cur, conversation_id, user)
            cur.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, key))

    def delete(self, conversation_id: str, user: str) -> str:
        """Delete the user's conversation; returns its internal key (to free its engine cache)."""
        with self.db.transaction() as cur:
            key = self._owned(cur, conversation_id, user)
            cur.execute("DELETE FROM messages WHERE conversation_id = ?", (key,))
            cur.execute("DELETE FROM conversations WHERE id = ?", (key,))
        return key

    def purge(self, older_than_days: float, now: float | None = None) -> list[str]:
        """Delete conversations not updated for the given number of days; returns their internal keys."""
        cutoff = (now or time.time()) - older_than_days * 86400
        with self.db.transaction() as cur:
            ids = [row[0] for row in cur.execute("SELECT id FROM conversations WHERE updated < ?", (cutoff,)).all()]
            for conversation_id in ids:
                cur.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
                cur.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return ids

    # ----- feedback --------------------------------------------------------------------------------------

    def feedback(self, conversation_id: str, message_id: int, user: str, rating: int, comment: str = "") -> None:
        """Thumbs up (+1) or down (-1) with an optional comment, stored with an assistant message."""
        with self.db.transaction() as cur:
            key = self._owned(cur, conversation_id, user)
            row = cur.execute("SELECT role FROM messages WHERE id = ? AND conversation_id = ?",
                              (message_id, key)).one()
            if row is None or row[0] != "assistant":
                raise NotFound(f"Unknown answer {message_id} in conversation '{conversation_id}'.")
            cur.execute("UPDATE messages SET rating = ?, feedback_comment = ?, feedback_at = ? WHERE id = ?",
                        (rating, comment, time.time(), message_id))

    def export_feedback(self, user: str | None = None) -> list[dict[str, Any]]:
        """Every rated answer with its question, for evaluating models from human judgement."""
        sql = ("SELECT c.client_id, c.personality, c.user_id, a.id, q.content, q.display, a.content, a.rating, "
               "a.feedback_comment, a.feedback_at FROM messages a JOIN conversations c ON c.id = a.conversation_id "
               "LEFT JOIN messages q ON q.id = a.parent_id "
               "WHERE a.rating IS NOT NULL")
        params: tuple = ()
        if user is not None:
            sql, params = sql + " AND c.user_id = ?", (user,)
        with self.db.transaction() as cur:
            rows = cur.execute(sql + " ORDER BY a.feedback_at", params).all()
        return [{"conversation": r[0], "personality": r[1], "user": r[2], "message_id": r[3],
                 "question": r[5] if r[5] is not None else r[4], "answer": r[6], "rating": r[7], "comment": r[8],
                 "at": r[9]} for r in rows]


def _path(rows: Sequence[tuple]) -> list[Turn]:
    """The visible turns of a message tree: from the root down, at each step the child chosen most recently;
    each turn knows its siblings (the variants shown as 1/2, 2/2)."""
    children: dict[Any, list[tuple]] = {}
    for row in rows:  # rows come in insertion order, so siblings are listed oldest first
        children.setdefault(row[1], []).append(row)
    turns, parent = [], None
    while parent in children:
        siblings = children[parent]
        chosen = max(siblings, key=lambda row: row[2] or 0.0)
        ident, _, _, role, content, display, sources, rating, comment = chosen
        turns.append(Turn(role, content, display, json.loads(sources), message_id=ident, rating=rating,
                          comment=comment, variants=[row[0] for row in siblings]))
        parent = ident
    return turns


class RetentionSweeper:
    """Deletes old conversations once an hour and frees their cached state in the engine."""

    def __init__(self, store: SqlConversationStore, engine, days: float, interval: float = 3600.0):
        self.store, self.engine, self.days, self.interval = store, engine, days, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> RetentionSweeper:
        self._thread.start()
        return self

    def sweep(self) -> list[str]:
        ids = self.store.purge(self.days)
        for conversation_id in ids:
            self.engine.forget(conversation_id)
        return ids

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # a database hiccup must not end retention for good
                log.exception("retention sweep failed")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
