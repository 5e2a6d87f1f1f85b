"""What looks like a secret: keys come from the environment only, and never reach a file, a log or a path.

Used to refuse secrets given as command-line overrides (they would be written to ``.hydra/`` and, in a sweep,
into run-dir names), to redact configs before they are saved (results.json, W&B), and to keep secret-looking
values out of paths.
"""

from __future__ import annotations

import re

# the last component of a config key that names a secret (not `api_key_env`, which names the *variable*,
# nor `max_new_tokens` / `tokenizer`)
SECRET_KEY = re.compile(r"(^|_)(api[_-]?key|access[_-]?key|token|secret|password|passwd|credentials?)$", re.I)
# values that look like credentials whatever key they are under
SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_-]{16,}"          # OpenAI and OpenAI-compatible keys
    r"|hf_[A-Za-z0-9]{16,}"            # Hugging Face tokens
    r"|gh[pousr]_[A-Za-z0-9]{20,}"     # GitHub tokens
    r"|AKIA[0-9A-Z]{16}"               # AWS access key ids
    r"|xox[baprs]-[A-Za-z0-9-]{10,}"   # Slack tokens
    r"|\b[0-9a-f]{40}\b)"              # 40 hex chars: W&B API keys
)


def is_secret_key(key: str) -> bool:
    """``judge.api_key``, ``hf_token``, ``password`` ... (the last dotted component)."""
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1].lstrip("+~")))


def looks_secret(value: object) -> bool:
    return isinstance(value, str) and bool(SECRET_VALUE.search(value))


def secret_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides (``key=value``) that name or carry a secret, values masked."""
    bad = []
    for ov in overrides:
        key, sep, value = str(ov).partition("=")
        if (sep and value and is_secret_key(key)) or looks_secret(value):
            bad.append(f"{key}=***")
    return bad


def mask(text: str) -> str:
    """``text`` with secret-looking substrings replaced (for paths and log lines)."""
    return SECRET_VALUE.sub("***", text)
