-- The web console's users. Passwords as Argon2id PHC strings; failures in a row and the
-- lock they lead to; never a plain password.
CREATE TABLE console_users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'auditor')),
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    last_login    INTEGER,
    failures      INTEGER NOT NULL DEFAULT 0,
    locked_until  INTEGER
);
