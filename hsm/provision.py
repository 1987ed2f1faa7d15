"""Initialise a token in a free slot (C_InitToken + C_InitPIN), for development and test tokens.

python-pkcs11 does not wrap C_InitToken, and softhsm2-util takes PINs only on argv or a TTY,
where they would leak into process listings. The standard PKCS#11 entry points are called here
through ctypes instead. Run this before python-pkcs11 loads the module in this process.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from hsm.errors import HsmError, TokenNotFoundError
from hsm.session import module_lock

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
CKR_OK = 0
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

_ULONG = ctypes.c_ulong


class _TokenInfo(ctypes.Structure):
    # Only the leading fields are read; the buffer is sized generously for the rest.
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturer_id", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serial_number", ctypes.c_char * 16),
        ("flags", _ULONG),
        ("rest", ctypes.c_ubyte * 512),
    ]


class _Module:
    def __init__(self, module_path: str) -> None:
        if not Path(module_path).exists():
            raise HsmError(f"PKCS#11 module not found: {module_path}")
        self.lib = ctypes.CDLL(module_path)
        rv = self.lib.C_Initialize(None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmError(f"C_Initialize failed: 0x{rv:x}")
        self._owns_init = rv == CKR_OK

    def check(self, rv: int, what: str) -> None:
        if rv != CKR_OK:
            raise HsmError(f"{what} failed: CKR 0x{rv:x}")

    def slots(self) -> list[tuple[int, str, int]]:
        count = _ULONG(0)
        self.check(self.lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
        ids = (_ULONG * max(count.value, 1))()
        self.check(self.lib.C_GetSlotList(ctypes.c_ubyte(1), ids, ctypes.byref(count)), "C_GetSlotList")
        result = []
        for slot_id in ids[: count.value]:
            info = _TokenInfo()
            self.check(self.lib.C_GetTokenInfo(_ULONG(slot_id), ctypes.byref(info)), "C_GetTokenInfo")
            label = bytes(info.label).decode("utf-8", "replace").rstrip(" \x00")
            result.append((int(slot_id), label, int(info.flags)))
        return result

    def close(self) -> None:
        if self._owns_init:
            self.lib.C_Finalize(None)


def token_exists(module_path: str, label: str) -> bool:
    with module_lock(module_path):
        module = _Module(module_path)
        try:
            return any(lbl == label and flags & CKF_TOKEN_INITIALIZED for _, lbl, flags in module.slots())
        finally:
            module.close()


def init_token(module_path: str, label: str, *, so_pin: str, user_pin: str) -> None:
    """Initialise the first uninitialised slot as token ``label`` with the given PINs."""
    if len(label.encode()) > 32:
        raise ValueError("a token label is at most 32 bytes")
    with module_lock(module_path):
        _init_token(module_path, label, so_pin, user_pin)


def _init_token(module_path: str, label: str, so_pin: str, user_pin: str) -> None:
    module = _Module(module_path)
    try:
        free = [slot for slot, _, flags in module.slots() if not flags & CKF_TOKEN_INITIALIZED]
        if not free:
            raise TokenNotFoundError("no free slot to initialise a token in")
        slot = _ULONG(free[0])
        so = so_pin.encode()
        user = user_pin.encode()
        padded_label = label.encode().ljust(32, b" ")
        module.check(module.lib.C_InitToken(slot, so, _ULONG(len(so)), padded_label), "C_InitToken")
        session = _ULONG(0)
        module.check(
            module.lib.C_OpenSession(
                slot, _ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION), None, None, ctypes.byref(session)
            ),
            "C_OpenSession",
        )
        try:
            module.check(module.lib.C_Login(session, _ULONG(CKU_SO), so, _ULONG(len(so))), "C_Login(SO)")
            module.check(module.lib.C_InitPIN(session, user, _ULONG(len(user))), "C_InitPIN")
            module.lib.C_Logout(session)
        finally:
            module.lib.C_CloseSession(session)
    finally:
        module.close()
