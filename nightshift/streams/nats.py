"""NATS credentials, as a Prefect block: what a stream's source (and sinks) log in with.

```yaml
source:
  server: nats://nats.internal:4222
  credentials: {block: nats-prod}      # a saved "Nightshift NATS Credentials" block
```

Give one of: ``user`` + ``password``, ``token``, ``creds`` (the contents of a ``.creds``
file: user JWT and NKey seed) or ``nkey_seed``. Secrets are ``SecretStr`` fields: the UI,
logs and artifacts never show them. Without a block, :func:`credentials_from_env` reads
``NATS_USER``/``NATS_PASSWORD``, ``NATS_TOKEN``, ``NATS_CREDS`` (a path) or
``NATS_NKEY_SEED`` from the environment; a stream spec never holds a secret.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class NatsCredentials(Block):
    """How to authenticate to a NATS server (one method; secrets stay secret)."""

    _block_type_name = "Nightshift NATS Credentials"
    _block_type_slug = "nightshift-nats-credentials"
    _description = "Credentials for a NATS server: user/password, token, .creds or NKey seed."

    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds: SecretStr | None = Field(default=None, description="contents of a .creds file")
    nkey_seed: SecretStr | None = None
    tls_ca_file: str | None = Field(default=None, description="CA bundle for tls:// servers")

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (secrets unwrapped only here)."""
        options: dict[str, Any] = {}
        if self.user:
            options["user"] = self.user
        if self.password:
            options["password"] = self.password.get_secret_value()
        if self.token:
            options["token"] = self.token.get_secret_value()
        if self.creds:
            options["user_credentials"] = _private_file(self.creds.get_secret_value(), ".creds")
        if self.nkey_seed:
            options["nkeys_seed_str"] = self.nkey_seed.get_secret_value()
        if self.tls_ca_file:
            import ssl

            options["tls"] = ssl.create_default_context(cafile=self.tls_ca_file)
        return options


def credentials_from_env(env: dict[str, str] | None = None) -> NatsCredentials:
    """Credentials from ``NATS_USER``/``NATS_PASSWORD``, ``NATS_TOKEN``, ``NATS_CREDS``
    (a file path) or ``NATS_NKEY_SEED``; empty credentials when none is set."""
    env = dict(os.environ if env is None else env)
    creds_path = env.get("NATS_CREDS")
    creds = Path(creds_path).read_text() if creds_path else None
    return NatsCredentials(
        user=env.get("NATS_USER") or None,
        password=_secret(env.get("NATS_PASSWORD")),
        token=_secret(env.get("NATS_TOKEN")),
        creds=_secret(creds),
        nkey_seed=_secret(env.get("NATS_NKEY_SEED")),
    )


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def _private_file(content: str, suffix: str) -> str:
    """nats-py reads .creds from a path: a 0600 temporary file, removed at exit."""
    import atexit

    fd, path = tempfile.mkstemp(suffix=suffix, prefix="nightshift-nats-")
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return path
