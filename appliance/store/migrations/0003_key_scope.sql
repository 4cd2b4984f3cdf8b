-- What a key may do: 'inference' (the OpenAI-compatible API) or 'admin' (the admin
-- API: status, model load and unload). A key has exactly one scope.
ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'inference'
    CHECK (scope IN ('inference', 'admin'));
