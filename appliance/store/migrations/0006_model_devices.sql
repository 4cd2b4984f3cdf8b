-- Devices models are pinned to from the console or `appliance model pin` (a model with
-- no row is placed automatically; `[devices]` in appliance.toml takes precedence).
CREATE TABLE model_devices (
    name    TEXT    PRIMARY KEY,
    device  TEXT    NOT NULL,            -- "cpu" or "cuda:N"
    set_at  INTEGER NOT NULL
);
