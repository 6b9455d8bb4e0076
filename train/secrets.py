"""Secrets never reach a saved config, W&B or a log: values under secret-looking keys (`*key`, `*token`, `*secret`,
`*password`), and the values of secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, ...) wherever they
appear in a string, are replaced by a placeholder."""

from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(^|[_.\-])(api_?key|key|token|secret|password|passwd)$", re.IGNORECASE)
"""A config key or environment variable holding a secret: `key` or a name ending in `_key` / `_token` / ... (not
`global_batch_tokens`, `tokenizer` or `monkey`)."""


def is_secret_key(name: str) -> bool:
    return bool(SECRET_KEY.search(name))


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (8+ characters, so no short value is masked everywhere)."""
    env = os.environ if env is None else env
    return sorted({v for k, v in env.items() if is_secret_key(k) and len(v) >= 8}, key=len, reverse=True)


def redact(obj, secrets: list[str] | None = None):
    """A copy of a plain config value (dicts, lists, scalars) with every secret replaced by `REDACTED`."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: REDACTED if is_secret_key(str(k)) and v not in (None, "") and not isinstance(v, (dict, list))
            else redact(v, secrets)
            for k, v in obj.items()
        }  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj
