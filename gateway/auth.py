"""API keys: stored as sha256 hashes, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import Request

from gateway.config import ApiKey
from gateway.errors import ApiError


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    admin: bool
    budgets: dict[str, float]  # period -> USD cap


ANONYMOUS = Principal(key_id="anonymous", admin=True, budgets={})


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        # each key's Principal built once: the request path hands the same (frozen) one to every request
        self._keys = [(bytes.fromhex(k.sha256), principal_of(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, request: Request, *, admin: bool = False) -> Principal:
        if not self._keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="missing_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        match = None
        for stored, principal in self._keys:  # every stored key is compared: timing says nothing about which
            if hmac.compare_digest(stored, digest):
                match = principal
        if match is None:
            raise ApiError(401, "Invalid API key.", code="invalid_api_key")
        if admin and not match.admin:
            raise ApiError(403, "This endpoint needs an admin key.", code="admin_required")
        return match


def principal_of(key: ApiKey) -> Principal:
    budgets = {p: v for p, v in (("day", key.budget_usd_per_day), ("month", key.budget_usd_per_month))
               if v is not None}
    return Principal(key_id=key.id, admin=key.admin, budgets=budgets)
