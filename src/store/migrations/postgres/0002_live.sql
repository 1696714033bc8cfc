-- What the nodes sharing the database hold right now (issue 19): which nodes
-- are alive, the calls each is running, every user's calls in flight across
-- the nodes, and every user's request bucket, and which node holds each code
-- session. All but the last describe the present only, so their tables are
-- UNLOGGED: no WAL, so a change commits
-- without waiting for a flush, and a crash of the database empties them
-- (each node writes back what it holds at its next heartbeat:
-- `crate::store::live`).

-- A node, while it lives: it writes `seen` every second; one unseen for the
-- lease is taken for dead, and its places are given back.
CREATE UNLOGGED TABLE nodes (
    node     TEXT PRIMARY KEY,
    -- Where the node listens, as it was configured (for operators).
    address  TEXT NOT NULL,
    started  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    seen     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- One row per call in flight on any node.
CREATE UNLOGGED TABLE places (
    call     TEXT PRIMARY KEY,
    user_id  TEXT COLLATE "C" NOT NULL,
    node     TEXT NOT NULL,
    since    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX places_by_node ON places (node);

-- Each user's count of rows in `places`, kept equal to it by every statement
-- that adds or removes one: the row a call's admission updates, so two nodes
-- admitting the same user's calls take turns on it, and the tier's cap holds
-- across the nodes.
CREATE UNLOGGED TABLE user_load (
    user_id  TEXT COLLATE "C" PRIMARY KEY,
    running  INTEGER NOT NULL
);

-- Each user's token bucket of requests, refilled by the database's clock.
CREATE UNLOGGED TABLE rate_buckets (
    user_id  TEXT COLLATE "C" PRIMARY KEY,
    tokens   DOUBLE PRECISION NOT NULL,
    "at"     TIMESTAMPTZ NOT NULL
);

-- The node whose memory holds an open code session: another node forwards
-- the session's requests there, and ends it when that node is gone.
ALTER TABLE sessions ADD COLUMN node TEXT;
CREATE INDEX sessions_open_by_node ON sessions (node) WHERE closed_at IS NULL;
