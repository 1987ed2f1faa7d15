-- depends: 0008_kbi
-- The binding transaction in one round trip. PostgresStore.commit_binding used to send BEGIN, the
-- individual's advisory lock, the OTP/nonce consumption, the supersede, the insert, the audit entry and
-- COMMIT as seven statements, each a round trip and, on the server, a GIL hand-off per wait; as one
-- function call in autocommit it is one statement and one implicit transaction, with the same steps in
-- the same order under the same lock. Every statement names the individual (p_id_hmac): on Citus the
-- function is distributed by p_id_hmac, colocated with bindings, and runs on that individual's shard.
-- A spent OTP or nonce raises SQLSTATE KB001 / KB002, which rolls everything back (the store maps them
-- to OtpAlreadyUsed); the attempt's reservation is released in the same transaction; a second active binding still fails on bindings_one_active (23505). Calling it
-- again with the same binding (same certificate thumbprint) changes nothing and succeeds.
CREATE FUNCTION kb_commit_binding(
    p_id_hmac bytea,
    p_partner_id text,
    p_factor text,
    p_psut text,
    p_key_fingerprint text,
    p_certificate_pem text,
    p_cert_thumbprint text,
    p_serial_hex text,
    p_issuer_key_label text,
    p_created_at timestamptz,
    p_expires_at timestamptz,
    p_now timestamptz,
    p_lock_namespace integer,
    p_lock_key integer,
    p_consume_otp text,
    p_consume_nonce text,
    p_audit_at timestamptz,
    p_audit_partner text,
    p_audit_action text,
    p_audit_outcome text,
    p_audit_reason text,
    p_audit_subject text,
    p_audit_payload bytea,
    p_genesis bytea,
    p_release_window timestamptz DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_namespace, p_lock_key);
    -- Idempotent: when a lost connection left the caller unsure whether this very binding committed, it
    -- calls again, and finding it is success (nothing is consumed twice).
    IF EXISTS (SELECT 1 FROM bindings WHERE id_hmac = p_id_hmac AND cert_thumbprint = p_cert_thumbprint) THEN
        RETURN;
    END IF;
    IF p_consume_otp IS NOT NULL THEN
        UPDATE otps SET state = 'used'
            WHERE id_hmac = p_id_hmac AND transaction_id = p_consume_otp AND state = 'pending';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the OTP was used already' USING ERRCODE = 'KB001';
        END IF;
    END IF;
    IF p_consume_nonce IS NOT NULL THEN
        UPDATE binding_nonces SET used_at = p_now
            WHERE id_hmac = p_id_hmac AND nonce = p_consume_nonce AND used_at IS NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the nonce was used already' USING ERRCODE = 'KB002';
        END IF;
    END IF;
    -- The attempt this binding's challenges were counted under (server.limits.reserve) is given back in this
    -- transaction: a success forgives no failure and costs none (server.limits.release).
    IF p_release_window IS NOT NULL THEN
        UPDATE individual_limits SET failures = failures - 1
            WHERE id_hmac = p_id_hmac AND fail_window_start = p_release_window AND failures >= 1;
    END IF;
    UPDATE bindings SET status = 'superseded', superseded_at = p_now
        WHERE id_hmac = p_id_hmac AND partner_id = p_partner_id AND auth_factor_type = p_factor AND status = 'active';
    INSERT INTO bindings (id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem,
                          cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at)
        VALUES (p_id_hmac, p_partner_id, p_factor, p_psut, p_key_fingerprint, p_certificate_pem,
                p_cert_thumbprint, p_serial_hex, p_issuer_key_label, 'active', p_created_at, p_expires_at);
    IF p_audit_payload IS NOT NULL THEN
        -- As PostgresStore's SQL_APPEND_AUDIT, on the individual's own chain (chain_key = id_hmac).
        INSERT INTO audit_log (chain_key, seq, at, partner_id, action, outcome, reason, subject, prev_hash, hash)
            SELECT p_id_hmac, h.seq + 1, p_audit_at, p_audit_partner, p_audit_action, p_audit_outcome,
                   p_audit_reason, p_audit_subject, h.hash, sha256(h.hash || int8send(h.seq + 1) || p_audit_payload)
            FROM (SELECT coalesce((SELECT a.seq FROM audit_log a WHERE a.chain_key = p_id_hmac
                                   ORDER BY a.seq DESC LIMIT 1), 0) AS seq,
                         coalesce((SELECT a.hash FROM audit_log a WHERE a.chain_key = p_id_hmac
                                   ORDER BY a.seq DESC LIMIT 1), p_genesis) AS hash) AS h;
    END IF;
END;
$$;
