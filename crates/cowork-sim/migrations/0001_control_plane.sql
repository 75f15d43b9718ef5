-- The control plane of the miniature service: the tables the runbook says must be protected.
-- Applied by `cowork-sim migrate` into the `schema_migrations` table.

CREATE TABLE {tenants} (
    id          text PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {accounts} (
    id            text PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    display_name  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {memberships} (
    tenant_id   text NOT NULL REFERENCES {tenants} (id),
    account_id  text NOT NULL REFERENCES {accounts} (id),
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account_id)
);

-- Only the SHA-256 of a token is stored; the token itself is shown once, when it is issued.
-- Operator and gateway tokens may be fleet-wide (no tenant); desktop tokens belong to a tenant.
CREATE TABLE {api_tokens} (
    id            text PRIMARY KEY,
    tenant_id     text REFERENCES {tenants} (id),
    account_id    text REFERENCES {accounts} (id),
    name          text NOT NULL,
    token_sha256  text NOT NULL UNIQUE CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    scope         text NOT NULL CHECK (scope IN ('desktop', 'operator', 'gateway')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK (scope <> 'desktop' OR tenant_id IS NOT NULL)
);

CREATE TABLE {sessions} (
    id                   text PRIMARY KEY,
    tenant_id            text NOT NULL REFERENCES {tenants} (id),
    account_id           text REFERENCES {accounts} (id),
    title                text NOT NULL,
    status               text NOT NULL CHECK (status IN ('idle', 'running', 'closed', 'errored')),
    next_event_sequence  bigint NOT NULL DEFAULT 1 CHECK (next_event_sequence >= 1),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {sessions_by_tenant} ON {sessions} (tenant_id, created_at DESC);

CREATE TABLE {session_events} (
    session_id  text NOT NULL REFERENCES {sessions} (id),
    sequence    bigint NOT NULL CHECK (sequence >= 1),
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, sequence)
);

-- A durable, derived view of a session's events up to `sequence`.
CREATE TABLE {session_projections} (
    session_id  text PRIMARY KEY REFERENCES {sessions} (id),
    sequence    bigint NOT NULL DEFAULT 0 CHECK (sequence >= 0),
    view        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {session_commands} (
    id                text PRIMARY KEY,
    session_id        text NOT NULL REFERENCES {sessions} (id),
    kind              text NOT NULL CHECK (kind IN ('prompt')),
    payload           jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'running', 'acked', 'failed')),
    claimed_by        text,
    lease_token       text,
    lease_expires_at  timestamptz,
    attempt_count     integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {session_commands_open} ON {session_commands} (created_at, id)
    WHERE status IN ('pending', 'running');
CREATE INDEX {session_commands_open_by_session} ON {session_commands} (session_id, created_at, id)
    WHERE status IN ('pending', 'running');

-- One lease per session: only its holder may append events; `checkpoint_version` counts the
-- checkpoints written to the object store.
CREATE TABLE {worker_leases} (
    session_id          text PRIMARY KEY REFERENCES {sessions} (id),
    worker_id           text NOT NULL,
    lease_token         text NOT NULL,
    expires_at          timestamptz NOT NULL,
    checkpoint_version  bigint NOT NULL DEFAULT 0 CHECK (checkpoint_version >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {worker_heartbeats} (
    worker_id           text PRIMARY KEY,
    hostname            text NOT NULL,
    pid                 integer NOT NULL,
    status              text NOT NULL CHECK (status IN ('running', 'stopped')),
    commands_processed  bigint NOT NULL DEFAULT 0,
    started_at          timestamptz NOT NULL DEFAULT now(),
    last_seen_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {artifact_index} (
    id            text PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES {tenants} (id),
    session_id    text NOT NULL REFERENCES {sessions} (id),
    kind          text NOT NULL CHECK (kind IN ('artifact', 'checkpoint', 'upload', 'export')),
    object_key    text NOT NULL UNIQUE,
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0),
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content_type  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {artifact_index_by_session} ON {artifact_index} (session_id);

CREATE TABLE {workflows} (
    id                text PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES {tenants} (id),
    name              text NOT NULL,
    prompt            text NOT NULL,
    schedule_seconds  integer NOT NULL CHECK (schedule_seconds > 0),
    status            text NOT NULL CHECK (status IN ('active', 'paused', 'running', 'failed')),
    next_run_at       timestamptz NOT NULL,
    last_run_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {workflows_due} ON {workflows} (next_run_at) WHERE status = 'active';

-- One run per workflow and due time: the idempotency key is `<workflow id>@<due unix ms>`.
CREATE TABLE {workflow_runs} (
    id               text PRIMARY KEY,
    workflow_id      text NOT NULL REFERENCES {workflows} (id),
    due_at           timestamptz NOT NULL,
    idempotency_key  text NOT NULL UNIQUE,
    claimed_by       text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'succeeded', 'failed')),
    session_id       text REFERENCES {sessions} (id),
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {workflow_runs_by_workflow} ON {workflow_runs} (workflow_id, due_at);

-- Bring-your-own-key secrets: an opaque ciphertext or a KMS reference, never the key itself.
CREATE TABLE {byok_secrets} (
    id           text PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES {tenants} (id),
    provider     text NOT NULL,
    ciphertext   bytea,
    kms_ref      text,
    last4        text NOT NULL CHECK (length(last4) = 4),
    key_version  integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz,
    CHECK ((ciphertext IS NULL) <> (kms_ref IS NULL))
);

CREATE TABLE {subscriptions} (
    id                  text PRIMARY KEY,
    tenant_id           text NOT NULL UNIQUE REFERENCES {tenants} (id),
    plan                text NOT NULL CHECK (plan IN ('free', 'team', 'enterprise')),
    status              text NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'canceled')),
    seats               integer NOT NULL CHECK (seats >= 0),
    current_period_end  timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {usage_events} (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES {tenants} (id),
    session_id  text REFERENCES {sessions} (id),
    kind        text NOT NULL,
    quantity    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {channel_bindings} (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES {tenants} (id),
    channel     text NOT NULL CHECK (channel IN ('slack', 'email', 'webhook', 'teams')),
    target      text NOT NULL,
    status      text NOT NULL CHECK (status IN ('active', 'paused')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The delivery cursor of one binding on one session: the last event sequence delivered (or
-- given up on). It only ever moves forward; the trigger below refuses anything else.
CREATE TABLE {channel_session_bindings} (
    binding_id           text NOT NULL REFERENCES {channel_bindings} (id),
    session_id           text NOT NULL REFERENCES {sessions} (id),
    last_event_sequence  bigint NOT NULL DEFAULT 0 CHECK (last_event_sequence >= 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (binding_id, session_id)
);
CREATE INDEX {channel_session_bindings_by_session} ON {channel_session_bindings} (session_id);

CREATE FUNCTION {channel_cursor_moves_forward_only}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_event_sequence < OLD.last_event_sequence THEN
        RAISE EXCEPTION 'delivery cursor of binding % on session % may only move forward (% -> %)',
            OLD.binding_id, OLD.session_id, OLD.last_event_sequence, NEW.last_event_sequence
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER {channel_session_bindings_forward_only}
    BEFORE UPDATE ON {channel_session_bindings}
    FOR EACH ROW EXECUTE FUNCTION {channel_cursor_moves_forward_only}();

CREATE TABLE {channel_deliveries} (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_delivery_id  text NOT NULL UNIQUE,
    binding_id          text NOT NULL REFERENCES {channel_bindings} (id),
    session_id          text NOT NULL REFERENCES {sessions} (id),
    event_sequence      bigint NOT NULL,
    payload             jsonb NOT NULL,
    status              text NOT NULL CHECK (status IN ('pending', 'claimed', 'sent', 'failed', 'dead')),
    attempt_count       integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by          text,
    claim_expires_at    timestamptz,
    last_error          text,
    sent_at             timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (binding_id, session_id, event_sequence),
    -- Every delivery has a cursor row: the gateway finds queue heads through it.
    FOREIGN KEY (binding_id, session_id)
        REFERENCES {channel_session_bindings} (binding_id, session_id)
);
CREATE INDEX {channel_deliveries_open} ON {channel_deliveries} (binding_id, session_id, event_sequence)
    WHERE status IN ('pending', 'claimed', 'failed');

CREATE TABLE {audit_events} (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text REFERENCES {tenants} (id),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
