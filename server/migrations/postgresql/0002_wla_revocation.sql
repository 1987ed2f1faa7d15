-- depends: 0001_initial
-- Revocation, the WLA replay cache and proof-of-possession nonces.
-- Unlike SQLite, PostgreSQL changes the bindings table in place: no row is copied, none can be lost.

-- The new CHECK only allows more values than the old one, so every existing row satisfies it.
ALTER TABLE bindings
    DROP CONSTRAINT bindings_status_check,
    ADD CONSTRAINT bindings_status_check CHECK (status IN ('active', 'superseded', 'revoked')),
    ADD COLUMN revoked_at timestamptz,
    ADD COLUMN revocation_reason text;

-- GetBinding by PSUT. The PSUT does not reveal the id_hmac: on a distributed database this lookup fans out.
CREATE INDEX bindings_by_psut ON bindings (psut, partner_id);

-- A WLA token's jti is accepted once until the token expires; replicas share this table.
-- Distribution column: id_hmac (first column of the primary key, so the key stays enforceable per shard).
CREATE TABLE wla_jtis (
    id_hmac     bytea NOT NULL,
    jti         text NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (id_hmac, jti)
);

-- Distribution column: id_hmac. Not yet possible as is: the primary key nonce does not contain it; Citus
-- needs PRIMARY KEY (id_hmac, nonce) (nonces are 192-bit random, so their global uniqueness is not at risk).
-- Every statement on this table filters by id_hmac.
CREATE TABLE binding_nonces (
    nonce       text PRIMARY KEY,
    id_hmac     bytea NOT NULL,
    partner_id  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

CREATE INDEX binding_nonces_by_individual ON binding_nonces (id_hmac, partner_id);
