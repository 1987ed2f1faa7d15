-- depends: 0003_shard_keys
-- Binding partners. The API key is kept only as its SHA-256 (the key is 256 random bits, shown once);
-- a partner may instead authenticate with an mTLS client certificate, pinned by its SHA-256 fingerprint.
-- Not distributed: a small reference table (replicated to every node on Citus), not per-individual;
-- every request reads it (through a short in-process cache), so reads must stay local.

CREATE TABLE partners (
    partner_id          text PRIMARY KEY,
    api_key_sha256      bytea NOT NULL CONSTRAINT partners_key_length CHECK (length(api_key_sha256) = 32),
    client_cert_sha256  text UNIQUE,
    enabled             boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
