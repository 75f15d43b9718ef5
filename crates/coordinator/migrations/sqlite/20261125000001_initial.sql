-- Coordinator state (SQLite). Times are unix milliseconds; JSON documents are TEXT.
-- Keep in step with ../postgres/20261125000001_initial.sql: one conformance suite runs on both.

-- The fencing token: one row, bumped atomically by every coordinator at start-up.
CREATE TABLE epoch_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT  NOT NULL
);
INSERT INTO epoch_counter (id, epoch) VALUES (1, 0);

-- Who took which epoch, when: for the operator reading history after a failover.
CREATE TABLE epochs (
    epoch      BIGINT PRIMARY KEY,
    holder     TEXT   NOT NULL,
    started_at BIGINT NOT NULL
);

CREATE TABLE runs (
    id          TEXT    PRIMARY KEY,
    kind        TEXT    NOT NULL,
    environment TEXT    NOT NULL,
    point_id    TEXT,
    plan        TEXT    NOT NULL,
    params      TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    reason      TEXT,
    epoch       BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    finished_at BIGINT
);
CREATE INDEX runs_by_state ON runs (state);
CREATE INDEX runs_by_created ON runs (created_at);

CREATE TABLE phases (
    run_id      TEXT    NOT NULL REFERENCES runs (id),
    idx         BIGINT  NOT NULL,
    name        TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    started_at  BIGINT,
    finished_at BIGINT,
    detail      TEXT,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE commands (
    command_id  TEXT    PRIMARY KEY,
    run_id      TEXT    NOT NULL REFERENCES runs (id),
    phase_idx   BIGINT  NOT NULL,
    agent       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    epoch       BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX commands_by_run ON commands (run_id, phase_idx);

CREATE TABLE results (
    command_id  TEXT    PRIMARY KEY REFERENCES commands (command_id),
    agent       TEXT    NOT NULL,
    epoch       BIGINT  NOT NULL,
    outcome     TEXT    NOT NULL,
    replayed    BOOLEAN NOT NULL,
    detail      TEXT    NOT NULL,
    output      TEXT    NOT NULL,
    received_at BIGINT  NOT NULL
);

CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT    NOT NULL REFERENCES runs (id),
    at      BIGINT  NOT NULL,
    kind    TEXT    NOT NULL,
    payload TEXT    NOT NULL
);
CREATE INDEX events_by_run ON events (run_id, seq);
