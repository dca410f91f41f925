"""Cloud credentials: where the AccessKey pair (and STS token) comes from.

Three sources (``cloud.credentials.source``):

* ``env`` — ``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` and optionally
  ``ALIBABA_CLOUD_SECURITY_TOKEN``, the vendor's standard names;
* ``file`` — files named in the config (mounted secrets), re-read on :meth:`reload` (SIGHUP);
* ``chain`` — the vendor's ``alibabacloud-credentials`` default provider chain (RAM role, STS
  refresh, OIDC on Kubernetes), installed with ``pip install 'energy-bridge[alibaba]'``.

No message or repr produced here ever contains a secret or token.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from bridge.config import CredentialsSettings, CredentialsSource
from bridge.errors import CredentialsError, CredentialsMalformedError
from bridge.push.signing import Credentials

__all__ = ["CredentialsProvider"]

ENV_ID = "ALIBABA_CLOUD_ACCESS_KEY_ID"
ENV_SECRET = "ALIBABA_CLOUD_ACCESS_KEY_SECRET"  # noqa: S105 - a variable name, not a secret
ENV_TOKEN = "ALIBABA_CLOUD_SECURITY_TOKEN"  # noqa: S105 - a variable name, not a secret


def _checked(value: str, where: str) -> str:
    """``value`` without surrounding whitespace, refused if anything else is not printable ASCII.

    AccessKey ids, secrets and STS tokens are printable ASCII without spaces; a line break inside
    one (a file saved with CRLF in the middle, a pasted variable) would otherwise go out in a
    request header.

    Raises:
        CredentialsMalformedError: naming ``where`` and the kind of character, never the value.
    """
    value = value.strip()
    for char in value:
        if "!" <= char <= "~":
            continue
        if char in "\r\n\u2028\u2029\x85":
            kind = "a line break"
        elif char.isspace():
            kind = "a space"
        elif char.isprintable():
            kind = "a non-ASCII character"
        else:
            kind = "a control character"
        raise CredentialsMalformedError(
            f"cloud credentials: {where} contains {kind}: a credential is one line of printable"
            " ASCII without spaces"
        )
    return value


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsMalformedError(
            f"cloud credentials: the {what} file {path} is not UTF-8 text"
        ) from None
    value = _checked(value, f"the {what} file {path}")
    if not value:
        raise CredentialsError(f"{what} file {path} is empty")
    return value


def _from_environment(name: str) -> str:
    return _checked(os.environ.get(name, ""), f"the environment variable {name}")


class CredentialsProvider:
    """Hands out the current credentials; :meth:`reload` picks up changes."""

    def __init__(self, settings: CredentialsSettings) -> None:
        self._settings = settings
        self._current: Credentials | None = None
        self._chain: Any = None

    @property
    def source(self) -> str:
        """The configured source name."""
        return self._settings.source.value

    def reload(self) -> None:
        """Forget cached credentials; the next :meth:`get` loads them again."""
        self._current = None

    async def get(self) -> Credentials:
        """The credentials to sign the next request with.

        Raises:
            CredentialsError: none are configured or they cannot be read.
        """
        if self._settings.source is CredentialsSource.CHAIN:
            return await asyncio.to_thread(self._from_chain)
        if self._current is None:
            self._current = self._load()
        return self._current

    def check_format(self) -> None:
        """Refuse credentials that are there but malformed (the start-up check of ``run``).

        Missing ones pass: the bridge starts, spools and reports not ready until they are
        there. The ``chain`` source is not asked here (it may need the network).

        Raises:
            CredentialsMalformedError: a credential file or variable holds a line break,
                space or control character.
        """
        if self._settings.source is CredentialsSource.CHAIN:
            return
        try:
            self._load()
        except CredentialsMalformedError:
            raise
        except CredentialsError:
            return

    def describe(self) -> str:
        """A description safe to print: source and AccessKey id only (never the secret)."""
        try:
            creds = self._current or (
                self._load() if self._settings.source is not CredentialsSource.CHAIN else None
            )
        except CredentialsError as exc:
            return f"{self.source}: NOT USABLE ({exc})"
        if creds is None:
            return f"{self.source}: resolved at run time by alibabacloud-credentials"
        token = ", STS token set" if creds.security_token else ""
        return f"{self.source}: AccessKey id {creds.access_key_id}, secret ****{token}"

    def _load(self) -> Credentials:
        s = self._settings
        if s.source is CredentialsSource.FILE:
            assert s.access_key_id_file is not None  # noqa: S101 - enforced by config validation
            assert s.access_key_secret_file is not None  # noqa: S101
            token = (
                _read_secret_file(s.security_token_file, "security token")
                if s.security_token_file is not None
                else None
            )
            return Credentials(
                _read_secret_file(s.access_key_id_file, "AccessKey id"),
                _read_secret_file(s.access_key_secret_file, "AccessKey secret"),
                token,
            )
        key_id = _from_environment(ENV_ID)
        secret = _from_environment(ENV_SECRET)
        token = _from_environment(ENV_TOKEN) or None
        if not key_id or not secret:
            missing = [n for n, v in ((ENV_ID, key_id), (ENV_SECRET, secret)) if not v]
            raise CredentialsError(f"cloud credentials missing: set {' and '.join(missing)}")
        return Credentials(key_id, secret, token)

    def _from_chain(self) -> Credentials:
        if self._chain is None:
            try:
                from alibabacloud_credentials.client import (  # noqa: PLC0415 - optional extra
                    Client,
                )
            except ImportError:
                raise CredentialsError(
                    "source 'chain' needs: pip install 'energy-bridge[alibaba]'"
                ) from None
            self._chain = Client()
        try:
            cred = self._chain.get_credential()
        except Exception as exc:  # noqa: BLE001 - vendor raises anything; keep the type only
            raise CredentialsError(
                f"alibabacloud-credentials chain failed: {type(exc).__name__}"
            ) from None
        where = "a value from the alibabacloud-credentials chain"
        token = cred.get_security_token()
        return Credentials(
            _checked(cred.get_access_key_id() or "", where),
            _checked(cred.get_access_key_secret() or "", where),
            _checked(token or "", where) or None,
        )
