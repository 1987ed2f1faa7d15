"""KBI: knowledge-based identification, as eSignet defines it: base64url of a JSON object of answers.

The fields are configured like eSignet's ``mosip.esignet.authenticator.default.auth-factor.kbi.field-details``
(id, type ``text`` | ``date``, a Java-style date format such as ``yyyy-MM-dd``). Answers are compared with the
individual's enrolled attributes, which are stored only as HSM-keyed HMACs of a normalised form: Unicode NFKC,
case-folded, whitespace collapsed; dates parsed into ISO ``yyyy-mm-dd``. Neither the answers nor the enrolled
attributes are kept or logged in clear. Knowledge answers are guessable, so the default factor rules never let a
KBI challenge bind alone.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from server.auth.base import FAILED, PASSED, Attempt, AuthContext, Verdict
from server.policy import DEFAULT_INDIVIDUAL_ID_FIELD, KbiField
from server.ports import KbiStore, KeyedHasher

NAME = "KBI"
FORMAT = "base64url-encoded-json"
#: MAC purpose of an enrolled KBI attribute.
MAC_KBI = "kbi"
#: eSignet bounds a KBI challenge to 50-500 characters by default; a few more fields fit in 2,048.
KBI_MIN_CHARS = 4
KBI_MAX_CHARS = 2048
MAX_ANSWER_CHARS = 256
MAX_FIELDS = 16
ISO_DATE = "%Y-%m-%d"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def check_fields(fields: Sequence[KbiField], id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD) -> None:
    if fields and not answer_fields(fields, id_field):
        raise ValueError(f"kbi_fields: only the individual-ID field {id_field!r}; configure at least one question")
    ids = [f.id for f in fields]
    if len(ids) != len(set(ids)):
        raise ValueError("kbi_fields: each field id may appear once")
    if len(ids) > MAX_FIELDS:
        raise ValueError(f"kbi_fields: at most {MAX_FIELDS} fields")


def normalise(field: KbiField, value: str) -> str | None:
    """The form that is hashed, or None when ``value`` is no answer for ``field`` (empty, too long, no date)."""
    if not value or len(value) > MAX_ANSWER_CHARS or not all(c.isprintable() or c.isspace() for c in value):
        return None
    if field.type == "date":
        for fmt in (field.date_format, ISO_DATE):  # the configured format, or ISO
            try:
                return datetime.strptime(value.strip(), fmt).date().isoformat()
            except ValueError:
                continue
        return None
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())
    return " ".join(text.split()) or None


def kbi_hmac(hasher: KeyedHasher, id_hmac: bytes, field_id: str, normalised: str) -> bytes:
    return hasher.mac(MAC_KBI, id_hmac, field_id, normalised)


def answer_fields(fields: Sequence[KbiField], id_field: str) -> tuple[KbiField, ...]:
    """The fields that are questions: all but the individual-ID field (eSignet lists it among the field details)."""
    return tuple(f for f in fields if f.id != id_field)


def enrolment_values(
    fields: Sequence[KbiField], answers: Mapping[str, object], *, id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD
) -> dict[str, str]:
    """The normalised form of an individual's KBI attributes; ValueError (naming the field, never the value) when an
    attribute is unknown, missing or not an answer for its field. Every configured question is required."""
    by_id = {f.id: f for f in answer_fields(fields, id_field)}
    if not by_id:
        raise ValueError("KBI attributes given, but no kbi_fields are configured")
    unknown = sorted(set(answers) - set(by_id))
    if unknown:
        raise ValueError(f"unknown KBI field(s) {unknown}; configured: {sorted(by_id)}")
    missing = sorted(set(by_id) - set(answers))
    if missing:
        raise ValueError(f"KBI field(s) {missing} missing: every configured field is required")
    normalised: dict[str, str] = {}
    for field_id, value in answers.items():
        field = by_id[field_id]
        norm = normalise(field, value) if isinstance(value, str) else None
        if norm is None:
            expected = f"a date ({field.format or 'yyyy-MM-dd'} or yyyy-MM-dd)" if field.type == "date" else "text"
            raise ValueError(f"KBI field {field_id!r} must be {expected} of 1 to {MAX_ANSWER_CHARS} characters")
        normalised[field_id] = norm
    return normalised


def enrolment_hmacs(
    hasher: KeyedHasher,
    fields: Sequence[KbiField],
    id_hmac: bytes,
    answers: Mapping[str, object],
    *,
    id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD,
) -> dict[str, bytes]:
    """The stored form of an individual's KBI attributes (``enrolment_values``, each HSM-keyed)."""
    values = enrolment_values(fields, answers, id_field=id_field)  # every value checked before the first is hashed
    return {field_id: kbi_hmac(hasher, id_hmac, field_id, norm) for field_id, norm in values.items()}


@dataclass(frozen=True, slots=True)
class KbiAnswers:
    """A decoded challenge: the normalised answer to every question, and the individual ID if it carried one."""

    answers: dict[str, str]
    individual_id: str | None

    def __repr__(self) -> str:  # answers are secrets
        return f"KbiAnswers(<{len(self.answers)} answers>)"


def decode_answers(
    challenge: str, fields: Sequence[KbiField], *, id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD
) -> KbiAnswers | None:
    """The challenge's answers, or None when it is malformed: not base64url of a JSON object, a question
    unanswered or answered with no valid value, or a key that is neither a question nor ``id_field``."""
    if not KBI_MIN_CHARS <= len(challenge) <= KBI_MAX_CHARS or not _BASE64URL.fullmatch(challenge):
        return None
    try:
        raw = base64.urlsafe_b64decode(challenge + "=" * (-len(challenge) % 4))
        decoded = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    questions = answer_fields(fields, id_field)
    if not isinstance(decoded, dict) or set(decoded) - {id_field} != {f.id for f in questions}:
        return None
    given_id = decoded.get(id_field)
    if given_id is not None and not isinstance(given_id, str):
        return None
    normalised: dict[str, str] = {}
    for field in questions:
        value = decoded[field.id]
        norm = normalise(field, value) if isinstance(value, str) else None
        if norm is None:
            return None
        normalised[field.id] = norm
    return KbiAnswers(normalised, given_id)


@dataclass(frozen=True, slots=True)
class KbiFactor:
    hasher: KeyedHasher
    store: KbiStore
    fields: tuple[KbiField, ...]
    id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD
    name: str = NAME
    format: str = FORMAT

    def well_formed(self, challenge: str) -> bool:
        return bool(answer_fields(self.fields, self.id_field)) and self._decode(challenge) is not None

    def _decode(self, challenge: str) -> KbiAnswers | None:
        return decode_answers(challenge, self.fields, id_field=self.id_field)

    def verify(self, attempt: Attempt, challenge: str) -> Verdict:
        decoded = self._decode(challenge)
        if decoded is None:  # well_formed ran first; kept for a caller that did not
            return FAILED
        enrolled = self.store.kbi_answers(attempt.id_hmac)
        passed = attempt.identity is not None
        if decoded.individual_id is not None:  # eSignet's form may carry the ID: it must be the request's
            passed &= hmac.compare_digest(decoded.individual_id.encode(), attempt.individual_id.encode())
        # Every field is hashed and compared, whatever failed before: the time taken says nothing.
        for field_id, norm in decoded.answers.items():
            given = kbi_hmac(self.hasher, attempt.id_hmac, field_id, norm)
            stored = enrolled.get(field_id)
            passed &= hmac.compare_digest(stored if stored is not None else bytes(len(given)), given)
            passed &= stored is not None
        return PASSED if passed else FAILED


def build(ctx: AuthContext) -> KbiFactor:
    return KbiFactor(ctx.hasher, ctx.kbi_answers, ctx.kbi_fields, ctx.kbi_individual_id_field)
