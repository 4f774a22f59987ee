"""Secrets, in one place: which names hold them, redaction of everything that leaves the process (params, tags,
artifacts, messages), stripping redacted values when a stored config is read back, and the credential
environment that Ray workers on other machines need (sent by object reference, never in a runtime_env).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

REDACTED = "***"

# Config keys and environment variables whose values are secrets.
SECRET_NAME = re.compile(r"key|secret|password|passwd|token|credential", re.IGNORECASE)
# user:password@ in any URI (http://alice:pw@host, postgresql://u:p@db/x, s3://AKIA:secret@bucket).
_URI_CREDENTIALS = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@", re.IGNORECASE)
# name=value / name: value pairs in free text where the name looks secret.
_SECRET_PAIR = re.compile(r"(?P<head>\b[\w.-]*(?:key|secret|password|passwd|token|credential)[\w.-]*\s*[=:]\s*)"
                          r"(?P<secret>[^\s,;'\"}]+)", re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter values are not scrubbed from free text (they would mangle ordinary words)
_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether a config key or variable name (dotted or not) holds a secret: *key*, *secret*, *password*, *token*."""
    return bool(SECRET_NAME.search(name))


def register_secret(value: Any) -> None:
    """Scrub `value` from everything `redact` sees from now on in this process."""
    if isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
        _registered.add(value)


def _known_secrets() -> list[str]:
    from_env = [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    from_uri = [m.group("secret") for m in _URI_CREDENTIALS.finditer(uri)]
    return sorted({*_registered, *from_env, *from_uri}, key=len, reverse=True)


def redact(text: Any) -> str:
    """`text` with URI passwords, name=secret pairs and every known secret value replaced by ***."""
    text = str(text)
    text = _URI_CREDENTIALS.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    for secret in _known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_config(data: Any, _key: str = "") -> Any:
    """A copy of a nested config with secret-named values replaced by *** (and registered for `redact`)."""
    if isinstance(data, dict):
        return {k: redact_config(v, f"{_key}.{k}" if _key else str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_config(v, _key) for v in data]
    if data is not None and is_secret_name(_key.rsplit(".", 1)[-1]):
        register_secret(str(data))
        return REDACTED
    if isinstance(data, str):
        return redact(data)
    return data


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without user:password@, user, password)."""
    match = _URI_CREDENTIALS.search(uri)
    if not match:
        return uri, None, None
    head = match.group("head")
    scheme, _, user = head.partition("://")
    return uri.replace(match.group(0), f"{scheme}://", 1), user or None, match.group("secret")


def secret_env() -> dict[str, str]:
    """Credential variables of this process that Ray workers on other machines need (MLflow, AWS)."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_INSECURE_TLS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    return {k: os.environ[k] for k in names if k in os.environ}


@dataclass(frozen=True)
class WorkerSecrets:
    """Credentials a Ray worker or actor needs and nothing may log: the tracking URI with its password, storage
    options and secret environment variables (set in the process when missing there). Sent as an object
    reference (ray.put), never in a runtime_env, whose values Ray shows in `ray list jobs --detail`, its jobs API
    and its runtime-env agent's log."""

    tracking_uri: str | None = None
    storage_options: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print secrets
        return "WorkerSecrets(***)"

    def export_env(self) -> None:
        """Set the secret environment variables this process lacks (a worker on another machine)."""
        for key, value in self.env.items():
            os.environ.setdefault(key, value)


def strip_redacted(tree: Any) -> Any:
    """A stored (redacted) config without its *** values, so credentials come from the environment again."""
    if isinstance(tree, dict):
        return {k: strip_redacted(v) for k, v in tree.items() if v != REDACTED}
    return tree


__all__ = ["REDACTED", "is_secret_name", "register_secret", "redact", "redact_config", "split_credentials",
           "secret_env", "strip_redacted", "WorkerSecrets"]
