"""Owner identities: kept owner-only, never overwritten, named by their public key; ``heclave keygen``."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from heclave.cli import main
from heclave.protocol.identity import Identity, IdentityError, parse_public


def test_an_identity_round_trips_with_owner_only_permissions(tmp_path):
    identity = Identity.generate()
    path = tmp_path / "owner.key"
    identity.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public == identity.public and loaded.curve == identity.curve
    assert Identity.generate().public != identity.public


def test_an_identity_is_never_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="never overwritten"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


def test_an_identity_others_can_read_is_refused(tmp_path):
    path = tmp_path / "owner.key"
    Identity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize("content", ["", "{}", '{"format": "heclave-identity/1", "static": "zz", "curve": "x"}'])
def test_a_malformed_identity_file_is_refused_with_advice(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="heclave keygen"):
        Identity.load(path)


def test_public_identities_parse_from_hex_only():
    identity = Identity.generate()
    assert parse_public(identity.public_hex) == identity.public
    for bad in ("", "00" * 31, "zz" * 32, identity.public_hex + "00"):
        with pytest.raises(IdentityError, match="64 hexadecimal"):
            parse_public(bad)


def test_keygen_writes_an_identity_and_prints_what_to_share(tmp_path):
    path = tmp_path / "me.key"
    result = CliRunner().invoke(main, ["keygen", "--out", str(path)])
    assert result.exit_code == 0, result.output
    identity = Identity.load(path)
    assert f"identity {identity.public_hex}" in result.output
    assert identity.curve.public.decode() in result.output
    again = CliRunner().invoke(main, ["keygen", "--out", str(path)])
    assert again.exit_code != 0 and "never overwritten" in again.output
