"""Binding partners: registration, API keys (stored as hashes only) and the per-request authentication."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from server.domain import Partner
from server.errors import BackendUnavailableError, InvalidPartnerError, RequiredHeaderMissingError
from server.policy import PARTNER_ID_PATTERN
from server.ports import BackendUnavailable, PartnerStore

log = logging.getLogger(__name__)

#: A recognisable prefix, so that a leaked key is easy to spot (and to scan for) in code and logs.
API_KEY_PREFIX: Final = "kb_"
#: 32 random bytes: far beyond brute force, so a fast hash is the right one to store (no slow KDF).
API_KEY_BYTES: Final = 32
#: Longest partner-api-key value looked at; anything longer cannot be a key of ours.
MAX_API_KEY_CHARS: Final = 256
#: Entries the in-process partner cache holds before it starts afresh (bounds memory under a flood of
#: made-up partner ids, which are cached as unknown too).
MAX_CACHE_ENTRIES: Final = 4096
#: A refused key is checked against the store again if the cached record is at least this old, so that a
#: rotated key (or a newly added partner) works within a second; wrong keys cost at most one read per second.
REFRESH_AFTER_SECONDS: Final = 1.0
_HASH_DOMAIN: Final = b"keybinder partner api key v1\0"


def new_api_key() -> str:
    """A fresh API key: ``kb_`` + 43 base64url characters (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_BYTES)


def hash_api_key(api_key: str) -> bytes:
    """SHA-256 of the key under a domain label. Keys are random 256-bit values: nothing to brute-force."""
    return hashlib.sha256(_HASH_DOMAIN + api_key.encode("utf-8", "surrogatepass")).digest()


def certificate_fingerprint(pem: str | bytes) -> str:
    """Lower-case hex SHA-256 of a certificate's DER: how a client certificate is mapped to a partner."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text.strip())).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly issued API key, shown to the operator once. Prints masked."""

    partner_id: str
    api_key: str = field(repr=False)


# -- administration (the CLI) -------------------------------------------------------------------


def check_partner_id(partner_id: str) -> str:
    if not PARTNER_ID_PATTERN.fullmatch(partner_id):
        raise ValueError("a partner id is 1-128 characters of A-Z a-z 0-9 . _ : - and starts with a letter or digit")
    return partner_id


def add_partner(
    store: PartnerStore, partner_id: str, now: datetime, *, client_cert_sha256: str | None = None
) -> IssuedKey:
    """Register a partner with a new API key (returned once). ValueError when the id is taken or bad."""
    check_partner_id(partner_id)
    key = new_api_key()
    record = Partner(partner_id, hash_api_key(key), True, client_cert_sha256, now, now)
    if not store.add_partner(record):
        raise ValueError(f"partner {partner_id!r} already exists (use rotate-key for a new key)")
    return IssuedKey(partner_id, key)


def rotate_key(store: PartnerStore, partner_id: str, now: datetime) -> IssuedKey:
    """Replace the partner's API key; the old one stops working (within the cache time on running servers)."""
    key = new_api_key()
    if not store.set_partner_key(partner_id, hash_api_key(key), now):
        raise ValueError(f"no partner {partner_id!r}")
    return IssuedKey(partner_id, key)


# -- authentication on the request path ---------------------------------------------------------

_UNKNOWN_HASH: Final = hash_api_key("not a key of any partner")


@dataclass(frozen=True, slots=True)
class _Entry:
    partner: Partner | None
    fetched: float
    expires: float


class PartnerAuthenticator:
    """Checks a request's partner credentials against the store, with a short in-process cache.

    Cost per request on a cache hit: one dict lookup, one SHA-256 of the presented key and one
    constant-time comparison. A partner that is disabled, re-keyed or removed stops being accepted
    within ``cache_seconds`` on every server (sooner on a server that receives SIGHUP); 0 disables
    the cache. Unknown partner ids are cached as unknown for the same time. A key that the cached
    record refuses is checked against the store again when that record is older than
    ``REFRESH_AFTER_SECONDS``, so a new key or a new partner is accepted within a second.
    """

    def __init__(
        self, store: PartnerStore, *, cache_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    # The lookups are split so that the gRPC layer can answer from the cache on the event loop and
    # send only a miss (a database query) to a worker thread.

    def cached(self, cache_key: str) -> tuple[bool, Partner | None]:
        """(hit, partner) for ``id:<partner id>`` or ``cert:<fingerprint>``, without I/O."""
        entry = self._cache.get(cache_key)
        if entry is None or entry.expires <= self._clock():
            return False, None
        return True, entry.partner

    def fetch(self, cache_key: str) -> Partner | None:
        """Read the partner from the store (blocking) and cache the answer."""
        kind, _, value = cache_key.partition(":")
        try:
            partner = self.store.get_partner(value) if kind == "id" else self.store.partner_by_certificate(value)
        except BackendUnavailable as err:
            raise BackendUnavailableError("the database is unavailable; retry later") from err
        if self.cache_seconds > 0:
            with self._lock:
                if len(self._cache) >= MAX_CACHE_ENTRIES:
                    self._cache.clear()
                now = self._clock()
                self._cache[cache_key] = _Entry(partner, now, now + self.cache_seconds)
        return partner

    def worth_refreshing(self, cache_key: str) -> bool:
        """True when a refusal came from a cached record old enough to read again (see the class doc)."""
        entry = self._cache.get(cache_key)
        return entry is not None and self._clock() - entry.fetched >= REFRESH_AFTER_SECONDS

    def invalidate(self) -> None:
        """Forget every cached partner (SIGHUP): the next request of each partner reads the store."""
        with self._lock:
            self._cache.clear()

    @staticmethod
    def check_headers(partner_id: str | None, api_key: str | None) -> tuple[str, str]:
        """The partner id and API key, present and well-formed, before any lookup."""
        if not partner_id:
            raise RequiredHeaderMissingError("the partner-id header is required")
        if not PARTNER_ID_PATTERN.fullmatch(partner_id):
            raise InvalidPartnerError("the partner-id header is malformed")
        if not api_key:
            raise RequiredHeaderMissingError("the partner-api-key header is required")
        return partner_id, api_key

    @staticmethod
    def verify_key(partner_id: str, api_key: str, partner: Partner | None) -> str:
        """The partner id when ``api_key`` is its current key; else ``invalid_partner``, one reason for all."""
        expected = partner.api_key_hash if partner is not None else _UNKNOWN_HASH
        presented = hash_api_key(api_key[:MAX_API_KEY_CHARS])
        # Compared in constant time, and compared even for an unknown partner, so that the answer's
        # timing does not tell which partner ids exist.
        matches = hmac.compare_digest(presented, expected) and len(api_key) <= MAX_API_KEY_CHARS
        if partner is None or not matches or not partner.enabled:
            raise InvalidPartnerError("unknown or disabled partner, or wrong API key")
        return partner_id

    @staticmethod
    def verify_certificate(partner_id: str | None, api_key: str | None, partner: Partner) -> str:
        """The partner a registered client certificate names; the headers, if sent, must agree with it."""
        if not partner.enabled:
            raise InvalidPartnerError("unknown or disabled partner, or wrong API key")
        if partner_id and partner_id != partner.partner_id:
            raise InvalidPartnerError("the partner-id header does not match the client certificate")
        if api_key:
            PartnerAuthenticator.verify_key(partner.partner_id, api_key, partner)
        return partner.partner_id
