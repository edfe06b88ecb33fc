"""API-key checks shared by the HTTP and gRPC servers.

A client presents `Authorization: Bearer <key>` (HTTP header or gRPC metadata). The comparison is
constant-time: both sides are hashed to fixed-length digests first, so neither the key's content nor
its length leaks through timing.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional

API_KEY_ENV = "PAGODA_API_KEY"


def authorization_ok(authorization: Optional[str], api_key: Optional[str]) -> bool:
    """True when no key is configured or `authorization` is exactly 'Bearer <api_key>'."""
    if api_key is None:
        return True
    presented = hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).digest()
    expected = hashlib.sha256(f"Bearer {api_key}".encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(presented, expected)
