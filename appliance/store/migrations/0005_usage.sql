-- Usage accounting: requests and tokens per hour, tenant, key and model (the console's
-- usage over time; a consortium's billing). Hours are unix time / 3600.
CREATE TABLE usage_hourly (
    hour              INTEGER NOT NULL,
    tenant            TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (hour, tenant, key_id, model)
);
CREATE INDEX usage_hourly_key ON usage_hourly (key_id, hour);
