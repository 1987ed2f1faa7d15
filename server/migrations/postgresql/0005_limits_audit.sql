-- depends: 0004_partners
-- Abuse limits shared by every replica, and the hash-chained audit trail (see server/audit.py).

-- Distribution column: id_hmac (the primary key). One row per individual, known or not: failures for
-- unknown IDs count the same, so lockouts reveal nothing. Read in the same query as the identity.
CREATE TABLE individual_limits (
    id_hmac            bytea PRIMARY KEY,
    otp_window_start   timestamptz,
    otp_sends          integer NOT NULL DEFAULT 0,
    fail_window_start  timestamptz,
    failures           integer NOT NULL DEFAULT 0,
    locked_until       timestamptz
);

-- Distribution column: partner_id. Written by one single-statement transaction per SendBindingOtp, on
-- the partner's own key (never together with an individual's rows).
CREATE TABLE partner_limits (
    partner_id        text PRIMARY KEY,
    otp_window_start  timestamptz NOT NULL,
    otp_sends         integer NOT NULL
);

-- Append-only, one hash chain per chain_key: an individual's id_hmac (so its entries co-locate with the
-- individual's rows and are written in the same single-shard transaction), 'partner:<id>' or 'admin'.
-- Distribution column: chain_key (bytea, like id_hmac, so the two co-locate). No global sequence of
-- entries exists; id is only a row handle for reports.
CREATE TABLE audit_log (
    id          bigserial NOT NULL,
    chain_key   bytea NOT NULL,
    seq         bigint NOT NULL CHECK (seq >= 1),
    at          timestamptz NOT NULL,
    partner_id  text NOT NULL,
    action      text NOT NULL,
    outcome     text NOT NULL,
    reason      text NOT NULL,
    subject     text NOT NULL,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL,
    PRIMARY KEY (chain_key, seq)
);

-- The trigger stops accidents; the hash chain exposes deliberate edits (`keybinder audit verify`).
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
