"""The exception tree of energy-bridge.

::

    BridgeError                   anything the bridge raises on purpose
    ├── ConfigError               bad configuration; names the offending key
    ├── MappingError              a message that cannot become readings; carries a reason code
    ├── MessageSkipped            a preset's message that is not a reading (an LWT): counted
    ├── SpoolError                the local spool cannot do what was asked
    │   ├── SpoolFullError        spool.max_bytes reached or the disk is full
    │   └── SpoolLockedError      another energy-bridge runs on this spool
    └── CredentialsError          no usable AccessKey / STS credentials
        └── CredentialsMalformedError  a credential holds a line break, space or control character

A push that does not end in ``"success"`` is not an exception: the push client returns a
:class:`~bridge.push.client.PushResult` (the cloud's code beside a typed
:class:`~bridge.push.retry.Failure`) and :func:`~bridge.push.retry.classify` decides.

Every exception carries its context as attributes, never secrets, and chains its
cause with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "ConfigError",
    "CredentialsError",
    "CredentialsMalformedError",
    "MappingError",
    "MessageSkipped",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
]


class BridgeError(Exception):
    """Base class of every error energy-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is invalid.

    Attributes:
        key: dotted path of the offending setting (``mqtt.port``), or ``""`` for the file.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class MappingError(BridgeError):
    """A message cannot be turned into readings.

    Attributes:
        reason: a short stable code used as a metric label (``bad_json``, ``bad_time`` ...).
        detail: a human sentence saying what exactly is wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class MessageSkipped(BridgeError):
    """A message on a preset's topics that is not a reading and needs none.

    A Tasmota ``LWT``, a Shelly ``online``, Homie metadata: acknowledged and counted, not
    dead-lettered.

    Attributes:
        reason: a short stable code used as a metric label (``availability`` ...).
        detail: a human sentence saying what the message was.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SpoolError(BridgeError):
    """The spool failed to read or write."""


class SpoolFullError(SpoolError):
    """The spool reached ``spool.max_bytes`` or the disk is full; nothing was written."""


class SpoolLockedError(SpoolError):
    """Another process holds the spool's lock (two bridges would push every row twice)."""


class CredentialsError(BridgeError):
    """No usable credentials could be loaded (the message never contains a secret)."""


class CredentialsMalformedError(CredentialsError):
    """A credential is there but cannot be right (a line break, space or control character).

    The message names the file or variable, never the value.
    """
