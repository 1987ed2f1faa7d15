"""Identity enrolment (`keybinder identities add|import`, tests): checked first, stored as HMACs only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from server.auth.kbi import enrolment_values
from server.domain import Identity
from server.pin_policy import check_pin
from server.stores import Store

if TYPE_CHECKING:
    from server.service import KeyBinderService


def check_identity(
    service: KeyBinderService, *, individual_id: str, pin: str | None, kbi: Mapping[str, str] | None = None
) -> None:
    """Validate an identity before anything is written (KeyBinderError or ValueError, a guessable PIN too)."""
    service.check_individual_id(individual_id)
    if pin is not None:
        check_pin(pin)
    if kbi:
        enrolment_values(service.policy.kbi_fields, kbi, id_field=service.policy.kbi_individual_id_field)


def identity_record(
    service: KeyBinderService,
    *,
    individual_id: str,
    email: str | None,
    phone: str | None,
    name: str | None,
    pin: str | None,
    kbi: Mapping[str, str] | None = None,
) -> Identity:
    """The row to store for an individual (checked first, its KBI answers too): only HMACs of the ID and PIN."""
    check_identity(service, individual_id=individual_id, pin=pin, kbi=kbi)
    id_hmac = service.id_hmac(individual_id)
    pin_hmac = service.pin_hmac(id_hmac, pin) if pin is not None else None
    return Identity(id_hmac, email or None, phone or None, name or None, pin_hmac)


def register_identity(
    service: KeyBinderService,
    store: Store,
    *,
    individual_id: str,
    email: str | None,
    phone: str | None,
    name: str | None,
    pin: str | None,
    kbi: Mapping[str, str] | None = None,
) -> bool:
    """Add or update an individual (replacing its PIN and KBI attributes); only HMACs of the ID, the PIN and the
    normalised KBI attributes are stored."""
    check_identity(service, individual_id=individual_id, pin=pin, kbi=kbi)
    id_hmac = service.id_hmac(individual_id)
    if service.resolve(individual_id) != id_hmac:
        raise ValueError("this ID is an alias of a registered individual; revoke the alias first")
    pin_hmac = service.pin_hmac(id_hmac, pin) if pin is not None else None
    kbi_hmacs = service.kbi_hmacs(id_hmac, kbi) if kbi else None
    return store.upsert_identity(Identity(id_hmac, email or None, phone or None, name or None, pin_hmac), kbi=kbi_hmacs)
