"""Initialise a token in a free slot (C_InitToken + C_InitPIN), for development and test tokens.

python-pkcs11 does not wrap C_InitToken, and softhsm2-util takes PINs only on argv or a TTY,
where they would leak into process listings. The standard PKCS#11 entry points are called here
through ctypes instead, reached through C_GetFunctionList: that is the one symbol every module
exports (p11-kit's client module exports nothing else). Run this before python-pkcs11 loads the
module in this process, or under the module lock, as the functions here do.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from hsm.errors import HsmError, TokenNotFoundError
from hsm.session import module_lock
from hsm.uri import Pkcs11Uri, apply_module_env

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
CKR_OK = 0
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

_ULONG = ctypes.c_ulong
_RV = ctypes.c_ulong
_PTR = ctypes.c_void_p


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


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


# CK_FUNCTION_LIST starts with the version, then the entry points in the order PKCS#11 fixes.
# Only the prefix this module calls is declared; the struct is read through the module's pointer.
_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "C_Initialize": (_PTR,),
    "C_Finalize": (_PTR,),
    "C_GetInfo": (_PTR,),
    "C_GetFunctionList": (_PTR,),
    "C_GetSlotList": (ctypes.c_ubyte, ctypes.POINTER(_ULONG), ctypes.POINTER(_ULONG)),
    "C_GetSlotInfo": (_ULONG, _PTR),
    "C_GetTokenInfo": (_ULONG, ctypes.POINTER(_TokenInfo)),
    "C_GetMechanismList": (_ULONG, _PTR, _PTR),
    "C_GetMechanismInfo": (_ULONG, _ULONG, _PTR),
    "C_InitToken": (_ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p),
    "C_InitPIN": (_ULONG, ctypes.c_char_p, _ULONG),
    "C_SetPIN": (_ULONG, _PTR, _ULONG, _PTR, _ULONG),
    "C_OpenSession": (_ULONG, _ULONG, _PTR, _PTR, ctypes.POINTER(_ULONG)),
    "C_CloseSession": (_ULONG,),
    "C_CloseAllSessions": (_ULONG,),
    "C_GetSessionInfo": (_ULONG, _PTR),
    "C_GetOperationState": (_ULONG, _PTR, _PTR),
    "C_SetOperationState": (_ULONG, _PTR, _ULONG, _ULONG, _ULONG),
    "C_Login": (_ULONG, _ULONG, ctypes.c_char_p, _ULONG),
    "C_Logout": (_ULONG,),
}


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version), *((name, _PTR) for name in _PROTOTYPES)]


class _Functions:
    """The module's entry points, typed, looked up in its CK_FUNCTION_LIST."""

    def __init__(self, table: _FunctionList) -> None:
        self._table = table

    def __getattr__(self, name: str) -> Any:
        args = _PROTOTYPES.get(name)
        address = getattr(self._table, name, None) if args is not None else None
        if args is None or not address:
            raise HsmError(f"the PKCS#11 module does not provide {name}")
        return ctypes.CFUNCTYPE(_RV, *args)(address)


class _Module:
    def __init__(self, module_path: str) -> None:
        if not Path(module_path).exists():
            raise HsmError(f"PKCS#11 module not found: {module_path}")
        try:
            dll = ctypes.CDLL(module_path)
            get_function_list = dll.C_GetFunctionList
        except (OSError, AttributeError) as err:
            raise HsmError(f"{module_path} is not a PKCS#11 module") from err
        get_function_list.restype = _RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        table = ctypes.POINTER(_FunctionList)()
        self.check(get_function_list(ctypes.byref(table)), "C_GetFunctionList")
        self.lib = _Functions(table.contents)
        rv = self.lib.C_Initialize(None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmError(f"C_Initialize failed: 0x{rv:x}")
        self._owns_init = rv == CKR_OK

    @staticmethod
    def check(rv: int, what: str) -> None:
        if rv != CKR_OK:
            raise HsmError(f"{what} failed: CKR 0x{rv:x}")

    def slots(self) -> list[tuple[int, str, int]]:
        count = _ULONG(0)
        self.check(self.lib.C_GetSlotList(1, None, ctypes.byref(count)), "C_GetSlotList")
        ids = (_ULONG * max(count.value, 1))()
        self.check(self.lib.C_GetSlotList(1, ids, ctypes.byref(count)), "C_GetSlotList")
        result = []
        for slot_id in ids[: count.value]:
            info = _TokenInfo()
            self.check(self.lib.C_GetTokenInfo(slot_id, ctypes.byref(info)), "C_GetTokenInfo")
            label = bytes(info.label).decode("utf-8", "replace").rstrip(" \x00")
            result.append((int(slot_id), label, int(info.flags)))
        return result

    def close(self) -> None:
        if self._owns_init:
            self.lib.C_Finalize(None)


def _module_of(module: str | Pkcs11Uri) -> str:
    """The module path; a URI's module environment (e.g. a server address) is applied first."""
    if isinstance(module, Pkcs11Uri):
        apply_module_env(module)
        return module.module_path
    return module


def token_exists(module: str | Pkcs11Uri, label: str) -> bool:
    module_path = _module_of(module)
    with module_lock(module_path):
        mod = _Module(module_path)
        try:
            return any(lbl == label and flags & CKF_TOKEN_INITIALIZED for _, lbl, flags in mod.slots())
        finally:
            mod.close()


def init_token(module: str | Pkcs11Uri, label: str, *, so_pin: str, user_pin: str, replace: bool = False) -> None:
    """Initialise the first uninitialised slot as token ``label`` with the given PINs.

    With ``replace`` the slot already holding token ``label`` is initialised again instead,
    which destroys every object on it: only for test tokens (``so_pin`` is then its SO PIN).
    """
    if len(label.encode()) > 32:
        raise ValueError("a token label is at most 32 bytes")
    module_path = _module_of(module)
    with module_lock(module_path):
        _init_token(module_path, label, so_pin, user_pin, replace)


def _init_token(module_path: str, label: str, so_pin: str, user_pin: str, replace: bool) -> None:
    module = _Module(module_path)
    try:
        slots = module.slots()
        candidates = [slot for slot, lbl, flags in slots if replace and flags & CKF_TOKEN_INITIALIZED and lbl == label]
        candidates += [slot for slot, _, flags in slots if not flags & CKF_TOKEN_INITIALIZED]
        if not candidates:
            raise TokenNotFoundError("no free slot to initialise a token in")
        slot = candidates[0]
        so = so_pin.encode()
        user = user_pin.encode()
        padded_label = label.encode().ljust(32, b" ")
        module.check(module.lib.C_InitToken(slot, so, len(so), padded_label), "C_InitToken")
        session = _ULONG(0)
        module.check(
            module.lib.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, ctypes.byref(session)),
            "C_OpenSession",
        )
        try:
            module.check(module.lib.C_Login(session, CKU_SO, so, len(so)), "C_Login(SO)")
            module.check(module.lib.C_InitPIN(session, user, len(user)), "C_InitPIN")
            module.lib.C_Logout(session)
        finally:
            module.lib.C_CloseSession(session)
    finally:
        module.close()
