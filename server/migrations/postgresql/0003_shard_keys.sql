-- depends: 0002_wla_revocation
-- Distributable keys: on Citus every PRIMARY KEY / UNIQUE constraint must contain the distribution
-- column, id_hmac. Random ids (transaction ids, nonces: 192 bits) and sequence ids stay unique in
-- practice; only their global uniqueness check across individuals is given up.
-- In place: no row is copied or lost.

ALTER TABLE otps DROP CONSTRAINT otps_pkey, ADD CONSTRAINT otps_pkey PRIMARY KEY (id_hmac, transaction_id);

ALTER TABLE binding_nonces
    DROP CONSTRAINT binding_nonces_pkey,
    ADD CONSTRAINT binding_nonces_pkey PRIMARY KEY (id_hmac, nonce);

ALTER TABLE bindings DROP CONSTRAINT bindings_pkey, ADD CONSTRAINT bindings_pkey PRIMARY KEY (id_hmac, id);

-- A thumbprint is the SHA-256 of a certificate with a random serial: unique by construction, and now
-- unique per individual by the check below; GetBinding by thumbprint is served by a plain index.
ALTER TABLE bindings DROP CONSTRAINT bindings_cert_thumbprint_key;

CREATE UNIQUE INDEX bindings_thumbprint_per_individual ON bindings (id_hmac, cert_thumbprint);

CREATE INDEX bindings_by_thumbprint ON bindings (cert_thumbprint);
