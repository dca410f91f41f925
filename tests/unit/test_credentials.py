"""Credentials are checked when read, naming where a malformed one came from.

Surrounding whitespace goes; anything else that cannot be in a key (a line break, a space, a
control character) is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import CredentialsSettings, CredentialsSource
from bridge.credentials import ENV_ID, ENV_SECRET, ENV_TOKEN, CredentialsProvider
from bridge.errors import CredentialsError, CredentialsMalformedError

SECRET = "pr1vate-s3cret-VALUE"
BAD_INSIDE = ["\r\n", "\n", " ", "\t", "\x00", "\x7f", "\u00e9", "\u2028"]


@pytest.fixture(autouse=True)
def _no_credentials_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_ID, ENV_SECRET, ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)


def _files(tmp_path: Path, key_id: str, secret: str) -> CredentialsProvider:
    (tmp_path / "id").write_text(key_id, "utf-8")
    (tmp_path / "secret").write_text(secret, "utf-8")
    return CredentialsProvider(
        CredentialsSettings(
            source=CredentialsSource.FILE,
            access_key_id_file=tmp_path / "id",
            access_key_secret_file=tmp_path / "secret",
        )
    )


async def test_credentials_file_values_lose_surrounding_whitespace(tmp_path: Path) -> None:
    """Test that a trailing newline (or CRLF, or spaces) around a file's value is dropped."""
    creds = await _files(tmp_path, " myid\r\n", f"\n{SECRET}\r\n").get()

    assert ("myid", SECRET) == (creds.access_key_id, creds.access_key_secret)


@pytest.mark.parametrize("bad", BAD_INSIDE)
async def test_credentials_file_with_a_bad_character_inside_is_refused(
    tmp_path: Path, bad: str
) -> None:
    """Test that a malformed secret file is refused naming the file, never the value.

    A secret file with a line break, space or control character inside is a
    CredentialsMalformedError naming the file and never the value.
    """
    provider = _files(tmp_path, "myid\n", SECRET[:8] + bad + SECRET[8:] + "\n")

    with pytest.raises(CredentialsMalformedError) as info:
        await provider.get()

    assert str(tmp_path / "secret") in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("name", [ENV_ID, ENV_SECRET, ENV_TOKEN])
async def test_credentials_variable_with_a_line_break_inside_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Test that a credential variable with a CR/LF inside is refused naming the variable."""
    monkeypatch.setenv(ENV_ID, "myid")
    monkeypatch.setenv(ENV_SECRET, SECRET)
    monkeypatch.setenv(name, "pr1vate\r\nX-Injected: 1")
    provider = CredentialsProvider(CredentialsSettings())

    with pytest.raises(CredentialsMalformedError) as info:
        await provider.get()

    assert f"the environment variable {name} contains a line break" in str(info.value)
    assert "pr1vate" not in str(info.value) + provider.describe()


async def test_credentials_variables_lose_surrounding_whitespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that whitespace around the variables' values is dropped."""
    monkeypatch.setenv(ENV_ID, " myid\n")
    monkeypatch.setenv(ENV_SECRET, f"{SECRET}\r\n")
    monkeypatch.setenv(ENV_TOKEN, "\ttoken-1 ")

    creds = await CredentialsProvider(CredentialsSettings()).get()

    assert ("myid", SECRET, "token-1") == (
        creds.access_key_id,
        creds.access_key_secret,
        creds.security_token,
    )


def test_credentials_check_format_refuses_malformed_and_lets_missing_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that check_format raises only for credentials present but malformed.

    check_format (the start-up check) raises only for credentials that are there
    but malformed: missing ones are a wait, not a mistake in what was given.
    """
    provider = CredentialsProvider(CredentialsSettings())
    provider.check_format()  # nothing set: passes
    monkeypatch.setenv(ENV_ID, "myid")
    monkeypatch.setenv(ENV_SECRET, "two words")

    with pytest.raises(CredentialsMalformedError) as info:
        provider.check_format()

    assert isinstance(info.value, CredentialsError)
    assert f"the environment variable {ENV_SECRET} contains a space" in str(info.value)
