"""TLS, mutual TLS and the bearer token from a file: real servers on loopback, real certificates
made here (a CA, a server certificate for localhost and 127.0.0.1, a client certificate)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from driver.api.credentials import TokenSource, is_loopback
from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config import ConfigError, load_config
from driver.config.service import ServiceConfig, TokenMissing

DEADLINE = 5.0  # seconds: every RPC here has one


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, san=None, usage=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM paths: ca, server cert/key (SAN localhost, 127.0.0.1), client cert/key (signed by
    the CA), and a second CA that signed nothing here."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("reclra test CA", ca_key, "reclra test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "localhost",
        server_key,
        "reclra test CA",
        ca_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(
        "a client", client_key, "reclra test CA", ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("another CA", other_key, "another CA", other_key, ca=True)
    return {
        "ca": _write(d / "ca.crt", ca),
        "server_cert": _write(d / "tls.crt", server),
        "server_key": _write(d / "tls.key", key=server_key),
        "client_cert": _write(d / "client.crt", client),
        "client_key": _write(d / "client.key", key=client_key),
        "other_ca": _write(d / "other.crt", other),
    }


def _serve(tmp_path: Path, **keys) -> Service:
    keys.setdefault("token", "s3cret")
    return Service(ServiceConfig(port=0, runs_dir=str(tmp_path / "runs"), **keys))


def _list(client: Client) -> list:
    return list(client.call("ListRuns", messages.ListRunsRequest(), timeout=DEADLINE).runs)


def _refused(client: Client) -> StatusCode:
    with pytest.raises(RpcError) as info:
        client.call("ListRuns", messages.ListRunsRequest(), timeout=DEADLINE)
    return info.value.code()


def test_tls_serves_health_and_calls_with_the_token(tmp_path, pki):
    svc = _serve(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        for target in (f"127.0.0.1:{svc.port}", f"localhost:{svc.port}"):
            client = Client(target, "s3cret", root_ca=pki["ca"])
            try:
                assert client.health() == "SERVING"
                assert _list(client) == []
            finally:
                client.close()
        wrong = Client(f"127.0.0.1:{svc.port}", "guess", root_ca=Path(pki["ca"]).read_bytes())
        try:
            assert _refused(wrong) == StatusCode.UNAUTHENTICATED
        finally:
            wrong.close()
    finally:
        svc.stop(0)


def test_tls_refuses_plain_text_and_an_untrusted_certificate(tmp_path, pki):
    svc = _serve(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        plain = Client(f"127.0.0.1:{svc.port}", "s3cret")
        untrusting = Client(f"127.0.0.1:{svc.port}", "s3cret", root_ca=pki["other_ca"])
        try:
            assert _refused(plain) == StatusCode.UNAVAILABLE
            assert _refused(untrusting) == StatusCode.UNAVAILABLE
        finally:
            plain.close()
            untrusting.close()
    finally:
        svc.stop(0)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(tmp_path, pki):
    svc = _serve(
        tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"], client_ca=pki["ca"]
    )
    target = f"127.0.0.1:{svc.port}"
    try:
        anonymous = Client(target, "s3cret", root_ca=pki["ca"])
        try:
            assert _refused(anonymous) == StatusCode.UNAVAILABLE  # the handshake fails
        finally:
            anonymous.close()
        client = Client(
            target, "s3cret", root_ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]
        )
        try:
            assert _list(client) == [] and client.health() == "SERVING"
        finally:
            client.close()
        # a certificate the CA signed is not enough without the token
        tokenless = Client(
            target, "guess", root_ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]
        )
        try:
            assert _refused(tokenless) == StatusCode.UNAUTHENTICATED
        finally:
            tokenless.close()
    finally:
        svc.stop(0)


def test_a_rotated_token_file_is_accepted_and_the_old_token_refused(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")  # the trailing newline of `echo` is not the token
    svc = _serve(tmp_path, token="", token_file=str(token_file))
    target = f"127.0.0.1:{svc.port}"
    old, new = Client(target, "first-token"), Client(target, "second-token-rotated")
    try:
        assert _list(old) == []
        assert _refused(new) == StatusCode.UNAUTHENTICATED
        token_file.write_text("second-token-rotated\n")
        assert _list(new) == []
        assert _refused(old) == StatusCode.UNAUTHENTICATED
        # Kubernetes rotates a mounted Secret by swapping a link: a new inode, same name
        swapped = tmp_path / "token.new"
        swapped.write_text("third-token-by-rename")
        os.replace(swapped, token_file)
        assert _refused(new) == StatusCode.UNAUTHENTICATED
        third = Client(target, "third-token-by-rename")
        try:
            assert _list(third) == []
        finally:
            third.close()
    finally:
        old.close()
        new.close()
        svc.stop(0)


def test_a_same_size_rewrite_within_one_mtime_tick_is_read_within_a_second(tmp_path):
    path = tmp_path / "token"
    path.write_text("aaaa")
    source = TokenSource(path=str(path), recheck_s=0.2)
    stat = path.stat()
    assert source.current() == b"aaaa"
    path.write_text("bbbb")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # inode, size and mtime unchanged
    assert source.current() == b"aaaa"
    time.sleep(0.25)
    assert source.current() == b"bbbb"


def test_a_token_file_that_empties_keeps_the_last_token(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("kept")
    source = TokenSource(path=str(path))
    with caplog.at_level(logging.WARNING, logger="driver.api.credentials"):
        path.write_text("")
        assert source.current() == b"kept"
        path.unlink()
        assert source.current() == b"kept"
    assert "missing or empty; the last token stays" in caplog.text
    path.write_text("next")
    assert source.current() == b"next"


def test_a_missing_or_empty_token_file_is_refused_at_start(tmp_path):
    missing = tmp_path / "no-such-token"
    with pytest.raises(TokenMissing, match=f"service.token_file: cannot read {missing}") as info:
        _serve(tmp_path, token="", token_file=str(missing))
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty-token"
    empty.write_text(" \n")
    with pytest.raises(TokenMissing, match=f"service.token_file: {empty} is empty"):
        _serve(tmp_path, token="", token_file=str(empty))
    assert not (tmp_path / "runs").exists()  # refused before anything started


def test_the_token_comes_from_token_then_token_file_then_the_environment(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    monkeypatch.setenv("RECLRA_TOKEN", "from-env")
    for keys, accepted in (
        ({"token": "from-config", "token_file": str(token_file)}, "from-config"),
        ({"token": "", "token_file": str(token_file)}, "from-file"),
        ({"token": ""}, "from-env"),
    ):
        svc = _serve(tmp_path, **keys)
        clients = {t: Client(f"127.0.0.1:{svc.port}", t) for t in ("from-config", "from-file")}
        clients["from-env"] = Client(f"127.0.0.1:{svc.port}", "from-env")
        try:
            for token, client in clients.items():
                if token == accepted:
                    assert _list(client) == []
                else:
                    assert _refused(client) == StatusCode.UNAUTHENTICATED
        finally:
            for client in clients.values():
                client.close()
            svc.stop(0)


def test_plain_text_off_loopback_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        _serve(tmp_path, addr="0.0.0.0")
    assert str(info.value) == (
        "service.addr 0.0.0.0 is not loopback and TLS is off: the bearer token would travel "
        "in clear; set service.tls_cert and service.tls_key, or service.allow_insecure = true"
    )
    assert not (tmp_path / "runs").exists()
    svc = _serve(tmp_path, addr="0.0.0.0", allow_insecure=True)
    try:
        client = Client(f"127.0.0.1:{svc.port}", "s3cret")
        try:
            assert _list(client) == []
        finally:
            client.close()
    finally:
        svc.stop(0)


def test_tls_off_loopback_starts(tmp_path, pki):
    svc = _serve(tmp_path, addr="0.0.0.0", tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        client = Client(f"localhost:{svc.port}", "s3cret", root_ca=pki["ca"])
        try:
            assert client.health() == "SERVING"
        finally:
            client.close()
    finally:
        svc.stop(0)


def test_what_counts_as_loopback():
    for addr in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(addr), addr
    for addr in ("0.0.0.0", "::", "10.0.0.5", "reclra.default.svc", "192.168.1.1"):
        assert not is_loopback(addr), addr


def test_bad_tls_keys_are_refused_in_one_line(tmp_path, pki):
    for keys, needle in (
        ({"tls_key": "k.pem"}, "service.tls_key is set but service.tls_cert is not"),
        ({"tls_cert": "c.pem"}, "service.tls_cert is set but service.tls_key is not"),
        ({"client_ca": "ca.pem"}, "service.client_ca (mutual TLS) needs TLS"),
        (
            {"client_ca": "ca.pem", "tls_key": "k.pem"},
            "service.tls_key is set but service.tls_cert is not",
        ),
        ({"max_run_memory_gib": -1.0}, "service.max_run_memory_gib: -1 is below the bound 0"),
        ({"max_run_memory_gib": float("inf")}, "service.max_run_memory_gib: inf is not a finite"),
        ({"data_roots": ("/data", "")}, "service.data_roots: every entry must name a folder"),
    ):
        with pytest.raises(ValueError) as info:
            ServiceConfig(**keys)
        assert needle in str(info.value) and "\n" not in str(info.value), info.value
    # through the config file's [service] section, as `reclra serve` reads it
    with pytest.raises(ConfigError, match="service.tls_key is set but service.tls_cert is not"):
        load_config(None, ['service.tls_key="/tls/tls.key"'])
    # files that are not there, or not what the key says
    for keys, needle in (
        (
            {"tls_cert": str(tmp_path / "nope.crt"), "tls_key": pki["server_key"]},
            f"service.tls_cert: cannot read {tmp_path / 'nope.crt'}",
        ),
        (
            {"tls_cert": pki["server_key"], "tls_key": pki["server_key"]},
            "service.tls_cert: " + pki["server_key"] + " holds no PEM certificate",
        ),
        (
            {"tls_cert": pki["server_cert"], "tls_key": pki["server_cert"]},
            "service.tls_key: " + pki["server_cert"] + " holds no PEM private key",
        ),
        (
            {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], "client_ca": "/x"},
            "service.client_ca: cannot read /x",
        ),
        (
            {"tls_cert": pki["server_cert"], "tls_key": pki["client_key"]},
            "service: cannot bind 127.0.0.1:0 with TLS; check that service.tls_key is the "
            "private key of service.tls_cert",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            _serve(tmp_path, **keys)
        assert needle in str(info.value) and "\n" not in str(info.value), info.value


def test_new_keys_read_from_the_config_file():
    cfg = load_config(
        None,
        [
            'service.tls_cert="/tls/tls.crt"',
            'service.tls_key="/tls/tls.key"',
            'service.client_ca="/tls/ca.crt"',
            'service.token_file="/token/token"',
            'service.data_roots=["/data", "/mnt/datasets"]',
            "service.max_run_memory_gib=12",
        ],
    ).service
    assert cfg.tls and cfg.client_ca == "/tls/ca.crt" and cfg.token_file == "/token/token"
    assert cfg.data_roots == ("/data", "/mnt/datasets") and cfg.max_run_memory_gib == 12.0
    assert not ServiceConfig().tls and ServiceConfig().allow_insecure is False


def test_client_arguments_that_do_not_go_together():
    with pytest.raises(ValueError, match="cert and key go together"):
        Client("127.0.0.1:1", "t", root_ca=b"x", cert=b"x")
    with pytest.raises(ValueError, match="need TLS"):
        Client("127.0.0.1:1", "t", root_ca=b"x", tls=False)
