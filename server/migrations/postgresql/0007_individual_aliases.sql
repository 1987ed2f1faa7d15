-- depends: 0006_issuer_lifecycle
-- Aliases (MOSIP: a UIN and revocable VIDs): each is the HSM-keyed HMAC of an ID, like individuals.id_hmac,
-- and names the individual's canonical id_hmac. Nothing existing changes: an individual without aliases
-- is exactly what it was.

-- Distribution column: alias_hmac (the primary key), like wallet_keys by its key: a request names an ID
-- and must find its individual before it knows the id_hmac. aliases_of (admin) filters by id_hmac and fans out.
CREATE TABLE individual_aliases (
    alias_hmac  bytea PRIMARY KEY,
    id_hmac     bytea NOT NULL,
    alias_type  text NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE INDEX individual_aliases_by_individual ON individual_aliases (id_hmac);
