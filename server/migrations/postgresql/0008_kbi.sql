-- depends: 0007_individual_aliases
-- KBI (knowledge-based identification, server/auth/kbi.py): an individual's enrolled attributes, one row per
-- configured field, each only as the HSM-keyed HMAC of its normalised form (never the answer in clear).
-- Written with the identity in one transaction (upsert_identity replaces them); read by the KBI factor only.

-- Distribution column: id_hmac (first in the primary key), co-located with individuals.
CREATE TABLE kbi_answers (
    id_hmac      bytea NOT NULL REFERENCES individuals (id_hmac) ON DELETE CASCADE,
    field_id     text NOT NULL,
    answer_hmac  bytea NOT NULL,
    PRIMARY KEY (id_hmac, field_id)
);
