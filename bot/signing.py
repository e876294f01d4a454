"""Ed25519 signatures on what the bot hands to pull runners.

The bot signs each step it queues for a runner pool with its private key
(``RUNBOOK_SIGNING_KEY``, generated into the state directory when absent); a runner holds
only the public key and runs nothing whose signature does not verify. The signature
covers the whole payload: the job id, the action, the argv and env as rendered by the
bot, the step, its attempt, the pool, the expiry, the timeout, the output cap and the
secret names and patterns. Whoever can write the bot's database can queue a payload, but
cannot make one a runner accepts, change one without breaking its signature, or make an
old one run again (runners remember the ids they ran, and refuse expired payloads).

A message on the wire: ``{"payload": {...}, "signature": "<base64>"}``; what is signed is
the payload as canonical JSON (sorted keys, no spaces, UTF-8).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bot.errors import ConfigError

# Every field a payload must carry: a runner refuses one missing any of them.
FIELDS = (
    "job_id",
    "action",
    "argv",
    "env",
    "step_run_id",
    "attempt",
    "pool",
    "expires_at",
    "timeout",
    "output_cap",
    "secret_env",
    "secret_patterns",
    "expect",
)


class Refused(Exception):
    """A message that must not run; `reason` is one of the refusal reasons counted in
    ``runbook_runner_refusals_total``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> dict[str, Any]:
    signature = key.sign(canonical(payload))
    return {"payload": dict(payload), "signature": base64.b64encode(signature).decode("ascii")}


def verify(public: Ed25519PublicKey, message: Any) -> dict[str, Any]:
    """The payload of a message signed by the holder of `public`; `Refused` otherwise."""
    if not isinstance(message, dict):
        raise Refused("bad_signature", "not a signed message")
    payload, signature = message.get("payload"), message.get("signature")
    if not isinstance(payload, dict) or not isinstance(signature, str):
        raise Refused("bad_signature", "not a signed message")
    try:
        public.verify(base64.b64decode(signature, validate=True), canonical(payload))
    except (InvalidSignature, ValueError):
        raise Refused(
            "bad_signature",
            "the signature does not verify with this runner's public key (altered, or "
            "signed by another key)",
        ) from None
    missing = [name for name in FIELDS if name not in payload]
    if missing:
        raise Refused("bad_signature", f"the payload lacks {', '.join(missing)}")
    return payload


# --- keys ------------------------------------------------------------------------------------


def load_or_create_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The bot's private key from `path` (PEM, PKCS#8), created there (mode 0600) if
    absent."""
    file = Path(path)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_private_key(file)  # another process created it first
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        return key
    return load_private_key(file)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def public_pem(key: Ed25519PrivateKey) -> str:
    """The public half, as a runner's ``--public-key`` file holds it."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
