-- The service's database. Executions and audit records are append-only;
-- triggers refuse updates and deletes of audit records.
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    tier        TEXT NOT NULL,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
    -- sha256 of the key; the key itself is never stored.
    hash        TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id),
    -- The key's first characters, to tell keys apart in listings.
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE IF NOT EXISTS tools (
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    -- The version string the tool gives itself (SDK `describe`), if any.
    label         TEXT,
    sha256        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    description   TEXT,
    input_schema  TEXT,
    registered_by TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    retired_at    TEXT,
    PRIMARY KEY (name, version)
);

CREATE TABLE IF NOT EXISTS executions (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    user_id         TEXT NOT NULL,
    tool            TEXT NOT NULL,
    tool_version    INTEGER,
    status          TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    report          TEXT NOT NULL,
    idempotency_key TEXT,
    -- sha256 of what was asked (tool, version, body): a reused key with a
    -- different request is refused rather than answered with the wrong report.
    request_hash    TEXT
);
CREATE INDEX IF NOT EXISTS executions_by_user ON executions (user_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS executions_by_idempotency_key
    ON executions (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The bytes of every stored report together (`[retention] max_bytes`), kept
-- by triggers so that knowing it never needs a scan. Made once, from the rows
-- already there, when a database older than this counter is first opened.
-- (The triggers avoid octet_length(), which sqlite3 shells before 3.43 lack.)
CREATE TABLE IF NOT EXISTS execution_bytes (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bytes  INTEGER NOT NULL
);
INSERT INTO execution_bytes (id, bytes)
    SELECT 1, (SELECT coalesce(sum(octet_length(report)), 0) FROM executions)
    WHERE NOT EXISTS (SELECT 1 FROM execution_bytes);
CREATE TRIGGER IF NOT EXISTS execution_bytes_added AFTER INSERT ON executions
    BEGIN UPDATE execution_bytes SET bytes = bytes + length(CAST(NEW.report AS BLOB)) WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS execution_bytes_removed AFTER DELETE ON executions
    BEGIN UPDATE execution_bytes SET bytes = bytes - length(CAST(OLD.report AS BLOB)) WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS execution_bytes_changed AFTER UPDATE OF report ON executions
    BEGIN UPDATE execution_bytes
          SET bytes = bytes - length(CAST(OLD.report AS BLOB)) + length(CAST(NEW.report AS BLOB)) WHERE id = 1; END;

CREATE TABLE IF NOT EXISTS audit (
    seq        INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT,
    user_id    TEXT,
    tool       TEXT,
    outcome    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_user ON audit (user_id, seq);
CREATE INDEX IF NOT EXISTS audit_by_kind ON audit (kind, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
-- Records leave the table only once archived (`crate::audit`): the archiver
-- moves `upto` forward (never back) after it wrote their segment, then
-- deletes them; any other delete is refused.
CREATE TABLE IF NOT EXISTS audit_archived (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    upto  INTEGER NOT NULL
);
INSERT OR IGNORE INTO audit_archived (id, upto) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS audit_archived_forward BEFORE UPDATE ON audit_archived
    WHEN NEW.upto < OLD.upto OR NEW.id != OLD.id
    BEGIN SELECT RAISE(ABORT, 'the audit archive only moves forward'); END;
CREATE TRIGGER IF NOT EXISTS audit_archived_kept BEFORE DELETE ON audit_archived
    BEGIN SELECT RAISE(ABORT, 'the audit archive mark is kept'); END;
DROP TRIGGER IF EXISTS audit_no_delete;
-- INSERT OR REPLACE would delete without a DELETE trigger: only appends.
CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE INSERT ON audit
    WHEN NEW.seq <= (SELECT max(seq) FROM audit)
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_delete_archived_only BEFORE DELETE ON audit
    WHEN OLD.seq > (SELECT upto FROM audit_archived WHERE id = 1)
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only (only archived ones leave the table)'); END;

-- Code sessions: their live instances are in the server's memory only; a row
-- says whose a session was and why it ended, so that a step sent to a session
-- that ended (idle, a limit, a restart) is answered with why.
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    tool        TEXT NOT NULL,
    opened_at   TEXT NOT NULL,
    closed_at   TEXT,
    -- user, idle, lifetime, shutdown, restart, or the status of the step that
    -- stopped it (timeout, cpu_limit, memory_limit, crashed, cancelled)
    reason      TEXT,
    steps       INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions (id) WHERE closed_at IS NULL;

-- What behaviour analysis or an admin put on a user for a while: `suspend`
-- (their keys answer 403 `suspended`) or `throttle` (a lower request rate).
-- A row whose `until` has passed no longer counts; lifting one deletes it.
CREATE TABLE IF NOT EXISTS restrictions (
    user_id  TEXT NOT NULL REFERENCES users(id),
    kind     TEXT NOT NULL CHECK (kind IN ('suspend', 'throttle')),
    -- Unix seconds.
    until    INTEGER NOT NULL,
    -- A throttle's requests per second.
    rate     INTEGER,
    reason   TEXT NOT NULL,
    by       TEXT NOT NULL,
    at       TEXT NOT NULL,
    PRIMARY KEY (user_id, kind)
);

-- Usage summed per minute (span 60) and, after a day, per hour (span 3600),
-- per user, tool, tier and status (`crate::store::rollups`); security events
-- are rows of tool '' with the event's kind as status. Histograms are JSON.
CREATE TABLE IF NOT EXISTS rollups (
    span             INTEGER NOT NULL,
    bucket           INTEGER NOT NULL,
    user_id          TEXT NOT NULL,
    tool             TEXT NOT NULL,
    tier             TEXT NOT NULL,
    status           TEXT NOT NULL,
    calls            INTEGER NOT NULL,
    limit_hits       INTEGER NOT NULL,
    bytes_written    INTEGER NOT NULL,
    security_events  INTEGER NOT NULL,
    cpu_ms_sum       REAL NOT NULL,
    cpu_hist         TEXT NOT NULL,
    memory_hist      TEXT NOT NULL,
    PRIMARY KEY (span, bucket, user_id, tool, tier, status)
);
CREATE INDEX IF NOT EXISTS rollups_by_bucket ON rollups (bucket);
