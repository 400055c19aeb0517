"""A persistent sqlite cache of answers, terminal failures and the cost ledger.

One file per run by default (`RUN_DIR/llm-cache.sqlite`). Each answer is committed the
moment it arrives (WAL journal), so a process killed mid-stage keeps every answer it had
received, and the rerun sends none of those requests again. Only successes are stored as
answers; failures that a resend would meet again (refusal, empty answer, content filter,
non-retryable HTTP error) are stored in their own table and replayed as failures.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.llm.types import FailureKind, Response, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL, finish_reason TEXT NOT NULL,
    answered_by TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, scope TEXT NOT NULL, model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, dollars REAL NOT NULL, created REAL NOT NULL
);
"""


class ResponseCache:
    """sqlite-backed store; used from one thread (the event loop's)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        # WAL + NORMAL: a commit survives a killed process (not a power cut) without an fsync each.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, key: str) -> Response | None:
        row = self._db.execute(
            "SELECT text, finish_reason, answered_by, prompt_tokens, completion_tokens FROM responses WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return Response(text=row[0], finish_reason=row[1], model=row[2], usage=Usage(row[3], row[4]), cached=True)

    def put(self, key: str, model: str, response: Response, scope: str = "", dollars: float = 0.0) -> None:
        """Store an answer and its ledger line (`scope`), in one transaction."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, response.text, response.finish_reason, response.model, response.usage.prompt_tokens,
                 response.usage.completion_tokens, time.time()),
            )
            self._db.execute("DELETE FROM failures WHERE key=?", (key,))
            if scope:
                self._ledger(key, scope, model, response.usage, dollars)

    def get_failure(self, key: str) -> tuple[FailureKind, str] | None:
        row = self._db.execute("SELECT kind, detail FROM failures WHERE key=?", (key,)).fetchone()
        return None if row is None else (FailureKind(row[0]), row[1])

    def put_failure(self, key: str, model: str, kind: FailureKind, detail: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                         (key, model, kind.value, detail, time.time()))

    def settled(self, key: str, failures_count: bool = True) -> bool:
        """A request for `key` would not be sent: it has an answer, or (when `failures_count`)
        a remembered terminal failure."""
        if self.get(key) is not None:
            return True
        return failures_count and self.get_failure(key) is not None

    def keys(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT key FROM responses")}

    # -- ledger --------------------------------------------------------------------------

    def record_cost(self, key: str, scope: str, model: str, usage: Usage, dollars: float) -> None:
        """A ledger line for a billed answer that is not stored as an answer (a refusal)."""
        with self._transaction():
            self._ledger(key, scope, model, usage, dollars)

    def _ledger(self, key: str, scope: str, model: str, usage: Usage, dollars: float) -> None:
        self._db.execute(
            "INSERT INTO ledger (key, scope, model, prompt_tokens, completion_tokens, dollars, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, scope, model, usage.prompt_tokens, usage.completion_tokens, dollars, time.time()),
        )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def spent(self, scope: str) -> float:
        """Dollars recorded for `scope` over every run that used this cache file."""
        return float(self._db.execute("SELECT COALESCE(SUM(dollars), 0) FROM ledger WHERE scope=?",
                                      (scope,)).fetchone()[0])

    def ledger_summary(self, scope: str | None = None) -> dict[str, dict[str, float]]:
        """Per model: answers billed, prompt and completion tokens, dollars."""
        where, args = ("WHERE scope=?", (scope,)) if scope else ("", ())
        out = {}
        for model, n, p, c, d in self._db.execute(
            f"SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(dollars) FROM ledger {where} "
            "GROUP BY model ORDER BY model", args
        ):
            out[model] = {"answers": int(n), "prompt_tokens": int(p), "completion_tokens": int(c),
                          "dollars": round(float(d), 6)}
        return out
