-- The model registry: models imported into the content-addressed store (models/sha256/),
-- by the name clients use. Several names may share one file.
CREATE TABLE models (
    name            TEXT    PRIMARY KEY,
    sha256          TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    architecture    TEXT    NOT NULL,
    parameters      INTEGER NOT NULL,
    quantization    TEXT    NOT NULL,
    context_length  INTEGER NOT NULL,
    chat_template   INTEGER NOT NULL,
    license         TEXT,
    provenance      TEXT    NOT NULL,             -- JSON object
    signed_by       TEXT,                         -- trusted signer's name; NULL = unsigned
    imported_at     INTEGER NOT NULL
);
CREATE INDEX models_sha256 ON models(sha256);
