-- depends: 0003_partners
-- Abuse limits shared by every process, and the hash-chained audit trail (see server/audit.py).

-- One row per individual (known or not: failures for unknown IDs count the same, so lockouts reveal nothing).
CREATE TABLE individual_limits (
    id_hmac            BLOB PRIMARY KEY,
    otp_window_start   TEXT,
    otp_sends          INTEGER NOT NULL DEFAULT 0,
    fail_window_start  TEXT,
    failures           INTEGER NOT NULL DEFAULT 0,
    locked_until       TEXT
);

CREATE TABLE partner_limits (
    partner_id        TEXT PRIMARY KEY,
    otp_window_start  TEXT NOT NULL,
    otp_sends         INTEGER NOT NULL
);

-- Append-only: one chain per chain_key (an individual's id_hmac, 'partner:<id>' or 'admin').
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_key   BLOB NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 1),
    at          TEXT NOT NULL,
    partner_id  TEXT NOT NULL,
    action      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    prev_hash   BLOB NOT NULL,
    hash        BLOB NOT NULL,
    UNIQUE (chain_key, seq)
);

-- The triggers stop accidents; the hash chain exposes deliberate edits (`keybinder audit verify`).
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
