-- The service's database on PostgreSQL (15 and later): the tables, keys and
-- protections of ../0001_schema.sql, which the SQLite backend runs. It runs
-- once, in the migration's transaction (`crate::store::postgres`), and is
-- never edited once released: a change is a new script.
--
-- Differences from the SQLite script, each kept to the same meaning:
-- * Text that is sorted or compared by range (ids listed in order, RFC 3339
--   times, rollup keys) is COLLATE "C": bytes, as SQLite compares, whatever
--   the database's locale.
-- * `executions.seq` has no default: the store numbers an execution
--   `max(seq) + 1` under the audit chain's lock, as SQLite numbers a rowid,
--   so the numbers follow the commits, have no gaps left by a refused
--   insert, and "all but the newest n" is `seq <= max(seq) - n`.
-- * TRUNCATE passes no row triggers: it is refused on the audit tables, and
--   resets the report byte counter on executions.
-- * The triggers raise exceptions with the SQLite triggers' messages.

CREATE TABLE users (
    id          TEXT COLLATE "C" PRIMARY KEY,
    tier        TEXT NOT NULL,
    admin       BOOLEAN NOT NULL DEFAULT false,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    -- sha256 of the key; the key itself is never stored.
    hash        TEXT PRIMARY KEY,
    user_id     TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    -- The key's first characters, to tell keys apart in listings.
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE tools (
    name          TEXT COLLATE "C" NOT NULL,
    version       BIGINT NOT NULL,
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

CREATE TABLE executions (
    seq             BIGINT PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    user_id         TEXT NOT NULL,
    tool            TEXT NOT NULL,
    tool_version    BIGINT,
    status          TEXT NOT NULL,
    started_at      TEXT COLLATE "C" NOT NULL,
    report          TEXT NOT NULL,
    idempotency_key TEXT,
    -- sha256 of what was asked (tool, version, body): a reused key with a
    -- different request is refused rather than answered with the wrong report.
    request_hash    TEXT
);
CREATE INDEX executions_by_user ON executions (user_id, seq);
CREATE UNIQUE INDEX executions_by_idempotency_key
    ON executions (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The bytes of every stored report together (`[retention] max_bytes`), kept
-- by triggers so that knowing it never needs a scan. One update per
-- statement: a prune's batch of deletes moves the counter once.
CREATE TABLE execution_bytes (
    id     BIGINT PRIMARY KEY CHECK (id = 1),
    bytes  BIGINT NOT NULL
);
INSERT INTO execution_bytes (id, bytes) VALUES (1, 0);

CREATE FUNCTION execution_bytes_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE execution_bytes SET bytes = bytes + (SELECT coalesce(sum(octet_length(report)), 0) FROM added)
        WHERE id = 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER execution_bytes_added AFTER INSERT ON executions
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION execution_bytes_added();

CREATE FUNCTION execution_bytes_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE execution_bytes SET bytes = bytes - (SELECT coalesce(sum(octet_length(report)), 0) FROM removed)
        WHERE id = 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER execution_bytes_removed AFTER DELETE ON executions
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION execution_bytes_removed();

-- Every update, not only of `report`: a trigger with transition tables
-- cannot name columns.
CREATE FUNCTION execution_bytes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE execution_bytes
        SET bytes = bytes - (SELECT coalesce(sum(octet_length(report)), 0) FROM before_update)
                          + (SELECT coalesce(sum(octet_length(report)), 0) FROM after_update)
        WHERE id = 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER execution_bytes_changed AFTER UPDATE ON executions
    REFERENCING OLD TABLE AS before_update NEW TABLE AS after_update
    FOR EACH STATEMENT EXECUTE FUNCTION execution_bytes_changed();

CREATE FUNCTION execution_bytes_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE execution_bytes SET bytes = 0 WHERE id = 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER execution_bytes_truncated AFTER TRUNCATE ON executions
    FOR EACH STATEMENT EXECUTE FUNCTION execution_bytes_truncated();

CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    "at"       TEXT COLLATE "C" NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT,
    user_id    TEXT,
    tool       TEXT,
    outcome    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_by_user ON audit (user_id, seq);
CREATE INDEX audit_by_kind ON audit (kind, seq);

CREATE FUNCTION audit_no_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_no_update();

-- Records leave the table only once archived (`crate::audit`): the archiver
-- moves `upto` forward (never back) after it wrote their segment, then
-- deletes them; any other delete is refused.
CREATE TABLE audit_archived (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    upto  BIGINT NOT NULL
);
INSERT INTO audit_archived (id, upto) VALUES (1, 0);

CREATE FUNCTION audit_archived_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.upto < OLD.upto OR NEW.id <> OLD.id THEN
        RAISE EXCEPTION 'the audit archive only moves forward';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_archived_forward BEFORE UPDATE ON audit_archived
    FOR EACH ROW EXECUTE FUNCTION audit_archived_forward();

CREATE FUNCTION audit_archived_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit archive mark is kept';
END
$$;
CREATE TRIGGER audit_archived_kept BEFORE DELETE ON audit_archived
    FOR EACH ROW EXECUTE FUNCTION audit_archived_kept();
CREATE TRIGGER audit_archived_not_truncated BEFORE TRUNCATE ON audit_archived
    FOR EACH STATEMENT EXECUTE FUNCTION audit_archived_kept();

-- Only appends: a record numbered at or below the newest is refused.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq <= (SELECT max(seq) FROM audit) THEN
        RAISE EXCEPTION 'audit records are append-only';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_append_only BEFORE INSERT ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();

CREATE FUNCTION audit_delete_archived_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.seq > (SELECT upto FROM audit_archived WHERE id = 1) THEN
        RAISE EXCEPTION 'audit records are append-only (only archived ones leave the table)';
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER audit_delete_archived_only BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_delete_archived_only();

CREATE FUNCTION audit_not_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only (only archived ones leave the table)';
END
$$;
CREATE TRIGGER audit_not_truncated BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_not_truncated();

-- Code sessions: their live instances are in the server's memory only; a row
-- says whose a session was and why it ended, so that a step sent to a session
-- that ended (idle, a limit, a restart) is answered with why.
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    tool        TEXT NOT NULL,
    opened_at   TEXT NOT NULL,
    closed_at   TEXT,
    -- user, idle, lifetime, shutdown, restart, or the status of the step that
    -- stopped it (timeout, cpu_limit, memory_limit, crashed, cancelled)
    reason      TEXT,
    steps       BIGINT
);
CREATE INDEX sessions_open ON sessions (id) WHERE closed_at IS NULL;

-- What behaviour analysis or an admin put on a user for a while: `suspend`
-- (their keys answer 403 `suspended`) or `throttle` (a lower request rate).
-- A row whose `until` has passed no longer counts; lifting one deletes it.
CREATE TABLE restrictions (
    user_id  TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    kind     TEXT COLLATE "C" NOT NULL CHECK (kind IN ('suspend', 'throttle')),
    -- Unix seconds.
    until    BIGINT NOT NULL,
    -- A throttle's requests per second.
    rate     BIGINT,
    reason   TEXT NOT NULL,
    "by"     TEXT NOT NULL,
    "at"     TEXT NOT NULL,
    PRIMARY KEY (user_id, kind)
);

-- Usage summed per minute (span 60) and, after a day, per hour (span 3600),
-- per user, tool, tier and status (`crate::store::rollups`); security events
-- are rows of tool '' with the event's kind as status. Histograms are JSON.
CREATE TABLE rollups (
    span             BIGINT NOT NULL,
    bucket           BIGINT NOT NULL,
    user_id          TEXT COLLATE "C" NOT NULL,
    tool             TEXT COLLATE "C" NOT NULL,
    tier             TEXT COLLATE "C" NOT NULL,
    status           TEXT COLLATE "C" NOT NULL,
    calls            BIGINT NOT NULL,
    limit_hits       BIGINT NOT NULL,
    bytes_written    BIGINT NOT NULL,
    security_events  BIGINT NOT NULL,
    cpu_ms_sum       DOUBLE PRECISION NOT NULL,
    cpu_hist         TEXT NOT NULL,
    memory_hist      TEXT NOT NULL,
    PRIMARY KEY (span, bucket, user_id, tool, tier, status)
);
CREATE INDEX rollups_by_bucket ON rollups (bucket);

-- Tools' modules and native specs, named as in a node's blobs/ directory
-- (`<sha256>.wasm`, `<sha256>.json`): a node that lacks one fetches it from
-- here and checks it against its row's sha256 before it runs it.
CREATE TABLE blobs (
    name   TEXT PRIMARY KEY,
    bytes  BYTEA NOT NULL
);
