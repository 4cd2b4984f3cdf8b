-- Tenants (member organisations) and their API keys. Keys are stored only as the
-- SHA-256 of their secret part; the secret itself is shown once and never stored.
CREATE TABLE tenants (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT    PRIMARY KEY,          -- public id, part of the key text
    tenant_id       INTEGER NOT NULL REFERENCES tenants(id),
    secret_sha256   BLOB    NOT NULL,
    created_at      INTEGER NOT NULL,             -- unix seconds
    expires_at      INTEGER,                      -- unix seconds; NULL = never
    revoked_at      INTEGER,
    models          TEXT,                         -- comma-separated allow-list; NULL = all
    rpm             INTEGER,                      -- requests per minute; NULL = unlimited
    tpm             INTEGER,                      -- tokens per minute
    max_concurrency INTEGER,
    replaced_by     TEXT,                         -- set by rotation
    label           TEXT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

-- Bumped in the same transaction as every key change, so a running daemon can tell
-- cheaply whether its in-memory key table is stale.
CREATE TABLE change_counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO change_counters (name, value) VALUES ('keys', 0);
