"""The results store: one SQLite database per output folder, `<output>/results.sqlite` (standard library, WAL).

Every scored sample is one row of `samples`, committed in its own transaction the moment it exists, keyed by
(model, task, length, sample_index) UNIQUE and written with INSERT OR IGNORE: a rerun of the same plan skips what is
stored, a kill -9 loses at most the sample in flight, and no sample is ever stored twice. Failures are rows too
(status 'error', score NULL, error_kind 'oom' | 'nonfinite' | 'exception').

Tables
    meta     (key PRIMARY KEY, value)                         schema version
    runs     (run_id, rank) PRIMARY KEY: argv, plan, git hash, package versions, device, dtype, seed, host, pid,
             times, status ('running' | 'done' | 'interrupted' | 'killed': found 'running' by a later run)
    models   (model PRIMARY KEY): spec, family, source, backend, dtype, state size, parameter count, tokenizer
             identity, paper row it maps to (setting, paper_model), describe() JSON
    cells    (model, task, length) PRIMARY KEY: identity JSON (seed, tokenizer sha, haystack identity, task config,
             model source, dtype) and its sha, status ('running' | 'done' | 'failed'), error, samples planned
             (NULL: a whole-cell task's full set), aggregate / meta JSON of tasks scored a cell at once (lm-eval)
    samples  (model, task, length, sample_index) UNIQUE: status, score, prediction, error_kind, error, metrics JSON,
             record JSON (input, references, needle depths, length, ...), sample_sha, seed, elapsed_s, rank, run_id

length is 0 for tasks without a context-length axis (SQLite treats NULLs as distinct in UNIQUE keys).

One run at a time per folder: a run holds an exclusive lock on `<output>/run.lock` (fcntl.flock, released by the
kernel when the process dies, kill -9 included) for its whole life; a second run is refused with the holder's pid,
host and command (FolderBusyError). Each sample row is also checked, in its own transaction, against the identity
of its cell: a row made under another configuration is never stored.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
LOCK_NAME = "run.lock"
NO_LENGTH = 0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT NOT NULL, rank INTEGER NOT NULL, world_size INTEGER NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL,
    argv TEXT, plan TEXT, git_hash TEXT, git_dirty INTEGER, packages TEXT, host TEXT,
    device TEXT, dtype TEXT, seed INTEGER, summary TEXT, pid INTEGER,
    PRIMARY KEY (run_id, rank)
);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY, spec TEXT, family TEXT, source TEXT, backend TEXT, device TEXT, dtype TEXT,
    state_floats_per_layer INTEGER, num_layers INTEGER, num_params_non_embedding INTEGER, num_params INTEGER,
    tokenizer_sha TEXT, tokenizer_name TEXT, paper_setting TEXT, paper_model TEXT, random_init INTEGER,
    describe TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    model TEXT NOT NULL, task TEXT NOT NULL, length INTEGER NOT NULL,
    identity TEXT NOT NULL, identity_sha TEXT NOT NULL, seed INTEGER, tokenizer_sha TEXT, haystack TEXT,
    num_samples INTEGER, status TEXT NOT NULL, error TEXT, run_id TEXT, updated_at TEXT,
    aggregate TEXT, meta TEXT,
    PRIMARY KEY (model, task, length)
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL, task TEXT NOT NULL, length INTEGER NOT NULL, sample_index INTEGER NOT NULL,
    status TEXT NOT NULL, score REAL, prediction TEXT, error_kind TEXT, error TEXT,
    metrics TEXT, record TEXT, sample_sha TEXT, seed INTEGER, elapsed_s REAL,
    run_id TEXT, rank INTEGER, created_at TEXT,
    UNIQUE (model, task, length, sample_index)
);
CREATE INDEX IF NOT EXISTS samples_by_cell ON samples (model, task, length, status);
"""


ADDED_COLUMNS = {"runs": {"pid": "INTEGER"}}    # columns newer than a store's tables: added on open


class CellIdentityError(RuntimeError):
    """A cell already stored under this output folder was produced by a different configuration."""


class StoreError(RuntimeError):
    """The output folder or its results.sqlite cannot be used; the message names the file and the fix."""


class FolderBusyError(StoreError):
    """Another run holds the output folder's lock."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def dumps(obj: Any) -> str:
    """JSON for the store: sorted keys, NaN/Inf as null (strict JSON readers choke on NaN)."""
    return json.dumps(_finite(obj), sort_keys=True, default=str, ensure_ascii=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def make_output_folder(folder: Path) -> None:
    """Create the output folder (and its parents); StoreError names what is in the way and what to do."""
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"output {folder} is a file, not a folder; pass a folder for --output (it will hold "
                         f"{DB_NAME})")
    blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise StoreError(f"output {folder} cannot be created: {blocker} is a file; pass an --output folder "
                         "whose parents are folders")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"output {folder} cannot be created ({err.strerror or err}); pass an --output folder "
                         "you can write to") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"output {folder} is not writable; make it writable (chmod u+w {folder}) or pass another "
                         "--output folder")


def store_error(path: Path, err: sqlite3.DatabaseError) -> StoreError:
    """A StoreError for an SQLite failure on opening `path`: corrupt or truncated, read-only, or unreadable."""
    text = str(err)
    if "readonly" in text or "read-only" in text:
        return StoreError(f"{path} is read-only ({text}); make it and its folder writable (chmod u+w {path} "
                          f"{path.parent}) or pass another --output folder. `report` reads it where it is.")
    if "unable to open" in text:
        return StoreError(f"{path} cannot be opened ({text}): check that it and its folder are readable and "
                          "writable, or pass another --output folder")
    return StoreError(
        f"{path} is not a readable results store ({text}): the file is corrupt or truncated. Nothing was written. "
        f"Move it aside (mv {path} {path}.corrupt) and rerun to start the folder afresh, or pass another --output; "
        f"`sqlite3 {path}.corrupt .recover` salvages what rows remain.")


class RunLock:
    """Exclusive lock on `<folder>/run.lock` for the life of one run (fcntl.flock: the kernel drops it when the
    process dies, so a kill -9 never leaves a stale lock). The file holds the holder's pid, host and command."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, command: list[str] | None = None) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot create the lock file {self.path} ({err.strerror or err}); pass an --output "
                             "folder you can write to") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderBusyError(
                f"another run is writing to {self.path.parent} ({holder}). Wait for it to finish (or stop it), "
                "or pass another --output folder: two runs in one folder would mix their samples.") from None
        info = {"pid": os.getpid(), "host": platform.node(), "started": now(), "command": command}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that is just starting"
    command = " ".join(info.get("command") or [])
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
            + (f": {command}" if command else ""))


@dataclass
class SampleRow:
    model: str
    task: str
    length: int
    sample_index: int
    status: str                      # "ok" | "error"
    score: float | None = None
    prediction: str = ""
    error_kind: str | None = None    # "oom" | "nonfinite" | "exception"
    error: str | None = None
    metrics: dict | None = None
    record: dict | None = None
    sample_sha: str | None = None
    seed: int | None = None
    elapsed_s: float | None = None
    run_id: str | None = None
    rank: int = 0


class ResultsStore:
    """The SQLite store of one output folder. Safe to share between processes of one host (WAL, busy timeout)."""

    def __init__(self, output: str | Path, create: bool = True, timeout_s: float = 120.0):
        self.folder = Path(output)
        self.path = self.folder / DB_NAME
        if not create and not self.path.is_file():
            raise FileNotFoundError(
                f"no results store at {self.path}; pass the --output folder of a run (it holds {DB_NAME})")
        if create:
            make_output_folder(self.folder)
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            if create:
                self._create_schema()
            self._check_version(allow_new=False)
        except sqlite3.DatabaseError as err:
            raise store_error(self.path, err) from err

    def _check_version(self, allow_new: bool) -> None:
        """StoreError unless the file holds this harness's schema version (allow_new: or no tables at all yet)."""
        has_meta = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta and allow_new and not self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name IN ('samples', 'cells', 'runs', 'models')").fetchone():
            return
        version = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            if has_meta else None
        if version is None or str(version[0]) != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {version and version[0]}; this harness reads "
                             f"version {SCHEMA_VERSION}. It was left as it is; use a fresh --output folder.")

    def _create_schema(self) -> None:
        """Tables (created if missing, newer columns added), after a check that every page of the file reads."""
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
        self._check_version(allow_new=True)             # another version's store is left exactly as it is
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            for table, columns in ADDED_COLUMNS.items():
                have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                for column, kind in columns.items():
                    if column not in have:
                        self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so two ranks never
        deadlock upgrading a read lock."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------ runs
    def start_run(self, run_id: str, rank: int, world_size: int, meta: dict) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO runs (run_id, rank, world_size, started_at, status, argv, plan, git_hash,"
                " git_dirty, packages, host, device, dtype, seed, pid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, rank, world_size, now(), "running", dumps(meta.get("argv")), dumps(meta.get("plan")),
                 meta.get("git_hash"), meta.get("git_dirty"), dumps(meta.get("packages")), meta.get("host"),
                 meta.get("device"), meta.get("dtype"), meta.get("seed"), os.getpid()))

    def mark_stale_runs(self) -> int:
        """Runs still 'running' become 'killed' (call while holding the folder's RunLock: no run of this folder is
        alive then, so these were killed without a chance to record it). Returns how many."""
        with self.transaction() as c:
            return c.execute("UPDATE runs SET status = 'killed' WHERE status = 'running'").rowcount

    def finish_run(self, run_id: str, rank: int, status: str, summary: dict) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ? AND rank = ?",
                      (now(), status, dumps(summary), run_id, rank))

    # ------------------------------------------------------------------------------------------------ models
    def put_model(self, row: dict) -> None:
        cols = ["model", "spec", "family", "source", "backend", "device", "dtype", "state_floats_per_layer",
                "num_layers", "num_params_non_embedding", "num_params", "tokenizer_sha", "tokenizer_name",
                "paper_setting", "paper_model", "random_init", "describe"]
        values = [dumps(row.get(c)) if c == "describe" else row.get(c) for c in cols]
        with self.transaction() as c:
            c.execute(f"INSERT OR REPLACE INTO models ({', '.join(cols)}, updated_at) "
                      f"VALUES ({', '.join('?' * len(cols))}, ?)", values + [now()])

    def model_name_for_spec(self, spec: str) -> str | None:
        row = self.conn.execute("SELECT model FROM models WHERE spec = ? ORDER BY updated_at DESC", (spec,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------------------------------------ cells
    def begin_cell(self, model: str, task: str, length: int, identity: dict, identity_sha: str,
                   num_samples: int | None, run_id: str) -> None:
        """Record a cell as running, or check that the stored cell was made by the same configuration."""
        with self.transaction() as c:
            row = c.execute("SELECT identity, identity_sha FROM cells WHERE model = ? AND task = ? AND length = ?",
                            (model, task, length)).fetchone()
            if row is not None and row["identity_sha"] != identity_sha:
                has_rows = c.execute("SELECT 1 FROM samples WHERE model = ? AND task = ? AND length = ? LIMIT 1",
                                     (model, task, length)).fetchone()
                if has_rows:
                    stored = json.loads(row["identity"])
                    diff = {k: (stored.get(k), identity.get(k)) for k in set(stored) | set(identity)
                            if stored.get(k) != identity.get(k)}
                    raise CellIdentityError(
                        f"cell ({model}, {task}, {length}) in {self.path} was produced by a different configuration; "
                        f"differences (stored, now): {diff}. Use a new --output folder, or the same settings "
                        "(seed, tokenizer, haystack, dtype) as the stored run.")
            c.execute(
                "INSERT INTO cells (model, task, length, identity, identity_sha, seed, tokenizer_sha, haystack,"
                " num_samples, status, error, run_id, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (model, task, length) DO UPDATE SET identity = excluded.identity,"
                " identity_sha = excluded.identity_sha, seed = excluded.seed, tokenizer_sha = excluded.tokenizer_sha,"
                " haystack = excluded.haystack, num_samples = MAX(COALESCE(cells.num_samples, 0),"
                " COALESCE(excluded.num_samples, 0)), status = CASE WHEN cells.status = 'done' THEN 'done'"
                " ELSE 'running' END, error = NULL, run_id = excluded.run_id, updated_at = excluded.updated_at",
                (model, task, length, dumps(identity), identity_sha, identity.get("seed"),
                 identity.get("tokenizer_sha"), dumps(identity.get("haystack")), num_samples, "running", None,
                 run_id, now()))

    def set_cell_status(self, model: str, task: str, length: int, status: str, error: str | None = None,
                        run_id: str | None = None) -> None:
        """Mark a cell done/failed; creates a bare row for cells that failed before they had an identity."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO cells (model, task, length, identity, identity_sha, status, error, run_id, updated_at)"
                " VALUES (?,?,?,'{}','',?,?,?,?) ON CONFLICT (model, task, length) DO UPDATE SET"
                " status = excluded.status, error = excluded.error, updated_at = excluded.updated_at",
                (model, task, length, status, error, run_id, now()))

    def set_cell_aggregate(self, model: str, task: str, length: int, aggregate: dict, meta: dict,
                           num_samples: int | None) -> None:
        """The cell-level metrics and provenance of a whole-cell task (lm-eval), and how many samples it asked for
        (None: the full set)."""
        with self.transaction() as c:
            c.execute("UPDATE cells SET aggregate = ?, meta = ?, num_samples = ? WHERE model = ? AND task = ?"
                      " AND length = ?", (dumps(aggregate), dumps(meta), num_samples, model, task, length))

    def cell(self, model: str, task: str, length: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM cells WHERE model = ? AND task = ? AND length = ?",
                                 (model, task, length)).fetchone()

    # ------------------------------------------------------------------------------------------------ samples
    def add_sample(self, row: SampleRow, identity_sha: str | None = None) -> bool:
        """Commit one sample row (its own transaction). False if the key was already stored (never overwrites).
        identity_sha: the identity of the cell the row was made for; CellIdentityError (nothing stored) when the
        stored cell has another one (another process changed its configuration meanwhile)."""
        with self.transaction() as c:
            if identity_sha is not None:
                cell = c.execute("SELECT identity_sha FROM cells WHERE model = ? AND task = ? AND length = ?",
                                 (row.model, row.task, row.length)).fetchone()
                if cell is None or cell[0] != identity_sha:
                    raise CellIdentityError(
                        f"sample {row.sample_index} of cell ({row.model}, {row.task}, {row.length}) was made under "
                        f"identity {identity_sha}, but the cell in {self.path} now has "
                        f"{cell[0] if cell else 'no row'}: another process changed it. Not stored; rerun alone "
                        "(one run per --output folder).")
            cur = c.execute(
                "INSERT OR IGNORE INTO samples (model, task, length, sample_index, status, score, prediction,"
                " error_kind, error, metrics, record, sample_sha, seed, elapsed_s, run_id, rank, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.model, row.task, row.length, row.sample_index, row.status,
                 row.score if row.score is None or math.isfinite(row.score) else None,
                 row.prediction, row.error_kind, row.error, dumps(row.metrics or {}), dumps(row.record or {}),
                 row.sample_sha, row.seed, row.elapsed_s, row.run_id, row.rank, now()))
            return cur.rowcount == 1

    def stored_samples(self, model: str, task: str, length: int) -> dict[int, tuple[str, str | None]]:
        """sample_index -> (status, sample_sha) of the rows stored for a cell."""
        rows = self.conn.execute(
            "SELECT sample_index, status, sample_sha FROM samples WHERE model = ? AND task = ? AND length = ?",
            (model, task, length)).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def first_error(self, model: str, task: str, length: int) -> str | None:
        """The error text of a cell's lowest-index failure row (None: no failures)."""
        row = self.conn.execute("SELECT error FROM samples WHERE model = ? AND task = ? AND length = ? AND "
                                "status = 'error' ORDER BY sample_index LIMIT 1", (model, task, length)).fetchone()
        return row[0] if row else None

    def delete_failed(self, model: str, task: str, length: int, indices: Iterable[int] | None = None) -> int:
        """Drop a cell's failure rows so that they are retried (--retry-failed): those of ``indices`` (a rank's own
        samples; another rank may already have stored its retried rows), or all when None."""
        sql = "DELETE FROM samples WHERE model = ? AND task = ? AND length = ? AND status = 'error'"
        with self.transaction() as c:
            if indices is None:
                return c.execute(sql, (model, task, length)).rowcount
            return sum(c.execute(sql + " AND sample_index = ?", (model, task, length, i)).rowcount for i in indices)

    # ------------------------------------------------------------------------------------------------ reading
    def query(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchall()


def check_readable(path: Path) -> None:
    """StoreError unless `path` is a results store whose every page reads, with no write-ahead log left behind
    that a read-only folder would hide (a run killed in a folder made read-only afterwards)."""
    wal = Path(f"{path}-wal")
    if not os.access(path.parent, os.W_OK) and wal.is_file() and wal.stat().st_size > 0:
        raise StoreError(f"{wal} holds rows not yet merged into {path}, and {path.parent} is read-only, so they "
                         f"cannot be read; copy the folder somewhere writable (cp -r {path.parent} DIR) and report "
                         "from the copy")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro" + ("" if os.access(path.parent, os.W_OK) else "&immutable=1"),
                               uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise store_error(path, err) from err
    if check != "ok":
        raise store_error(path, sqlite3.DatabaseError(f"database disk image is malformed ({check})"))
    if version is None or str(version[0]) != str(SCHEMA_VERSION):
        raise StoreError(f"{path} has schema version {version and version[0]}; this harness reads version "
                         f"{SCHEMA_VERSION}")


def open_store(output: str | Path) -> ResultsStore:
    """Open an existing store for reading (report, export); FileNotFoundError names the missing file."""
    return ResultsStore(output, create=False)
