-- depends: 0005_issuer_lifecycle
-- Aliases (MOSIP: a UIN and revocable VIDs): each is the HSM-keyed HMAC of an ID, like individuals.id_hmac,
-- and names the individual's canonical id_hmac. Nothing existing changes: an individual without aliases
-- is exactly what it was.

CREATE TABLE individual_aliases (
    alias_hmac  BLOB PRIMARY KEY,
    id_hmac     BLOB NOT NULL,
    alias_type  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
);

CREATE INDEX individual_aliases_by_individual ON individual_aliases (id_hmac);
