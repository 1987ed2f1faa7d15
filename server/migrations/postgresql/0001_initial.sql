-- KeyBinder schema v1 (PostgreSQL). Same logical schema as migrations/sqlite/0001_initial.sql, native types:
-- bytea for HMACs, timestamptz for times, bigserial ids.
-- Every row that describes a person is keyed by id_hmac, the HSM-keyed HMAC of the individual ID.
--
-- Distributed PostgreSQL: each table's comment names its distribution column. This schema is the
-- single-node one; it is NOT yet distributable unchanged:
-- * Citus only accepts PRIMARY KEY / UNIQUE constraints that contain the distribution column; where a
--   constraint here does not, the comment says what a distributed deployment has to change or give up.
-- * YugabyteDB shards a table by the hash of its primary key's first column and keeps every other unique
--   index as a separate distributed index; there the same rewrite applies (id_hmac first in the primary
--   key), and the other unique indexes keep working at the cost of a distributed write.

-- Distribution column: id_hmac (the primary key). Every statement on it filters by id_hmac, except the
-- admin count of all individuals, which fans out to every shard.
CREATE TABLE individuals (
    id_hmac     bytea PRIMARY KEY,
    email       text,
    phone       text,
    name        text,
    pin_hmac    bytea,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Distribution column: id_hmac. Not yet possible as is: the primary key transaction_id does not contain it,
-- so Citus needs PRIMARY KEY (id_hmac, transaction_id) instead; transaction ids are 192-bit random, so
-- dropping their global uniqueness check loses nothing in practice. discard_otp and the test helper
-- otp_state look an OTP up by transaction_id alone (the port passes no id_hmac) and fan out.
CREATE TABLE otps (
    transaction_id  text PRIMARY KEY,
    id_hmac         bytea NOT NULL,
    partner_id      text NOT NULL,
    otp_hmac        bytea NOT NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL,
    state           text NOT NULL CONSTRAINT otps_state_check CHECK (state IN ('pending', 'used', 'replaced')),
    CONSTRAINT otps_attempts_check CHECK (attempts >= 0 AND attempts <= max_attempts)
);
-- Sending a new OTP invalidates the previous one: at most one outstanding per individual and partner.
-- (Contains id_hmac, so it stays enforceable per shard.)
CREATE UNIQUE INDEX otps_one_pending ON otps (id_hmac, partner_id) WHERE state = 'pending';

-- Distribution column: id_hmac. Not yet possible as is: the primary key id (a sequence) and the UNIQUE
-- cert_thumbprint do not contain it. Citus needs PRIMARY KEY (id_hmac, id); global uniqueness of
-- cert_thumbprint cannot be enforced across shards (a thumbprint is a SHA-256 of a certificate with a
-- random serial, so a collision is not a practical concern, but the database would no longer check it).
-- Lookups by cert_thumbprint (GetBinding, WLA error reporting) and by psut (GetBinding) cannot name the
-- shard: the PSUT and the thumbprint do not reveal the id_hmac, so those queries fan out to every shard.
CREATE TABLE bindings (
    id                bigserial PRIMARY KEY,
    id_hmac           bytea NOT NULL,
    partner_id        text NOT NULL,
    auth_factor_type  text NOT NULL,
    psut              text NOT NULL,
    key_fingerprint   text NOT NULL,
    certificate_pem   text NOT NULL,
    cert_thumbprint   text NOT NULL UNIQUE,
    serial_hex        text NOT NULL,
    issuer_key_label  text NOT NULL,
    status            text NOT NULL CONSTRAINT bindings_status_check CHECK (status IN ('active', 'superseded')),
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    superseded_at     timestamptz
);
-- The schema, not only the code, guarantees one active binding per individual, partner and factor.
-- (Contains id_hmac, so it stays enforceable per shard.)
CREATE UNIQUE INDEX bindings_one_active ON bindings (id_hmac, partner_id, auth_factor_type) WHERE status = 'active';
CREATE INDEX bindings_by_individual ON bindings (id_hmac, partner_id);

-- A wallet key belongs to one individual for good: binding it to another is refused.
-- Distribution column: key_fingerprint, NOT id_hmac. The rule "one key, one individual" is a uniqueness
-- constraint across individuals, so this table cannot live on the individual's shard. The key is claimed
-- in a single-row transaction of its own on the key's shard (PostgresStore.claim_key), never inside an
-- individual's binding transaction. (Comment updated after release; the schema is unchanged.)
CREATE TABLE wallet_keys (
    key_fingerprint  text PRIMARY KEY,
    id_hmac          bytea NOT NULL,
    created_at       timestamptz NOT NULL
);

-- Not distributed: a handful of rows read by every replica; a reference table (replicated to every node
-- on Citus), so joins and reads stay local.
CREATE TABLE issuers (
    key_label        text PRIMARY KEY,
    key_kind         text NOT NULL,
    certificate_pem  text NOT NULL,
    not_after        timestamptz NOT NULL,
    created_at       timestamptz NOT NULL
);
