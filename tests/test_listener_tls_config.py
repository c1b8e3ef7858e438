"""The listener's TLS settings as config (errors at their key paths, the open-listener
rule, ``tokenrelay check``), and the real process served to curl and ``openssl s_client``:
uvloop's SSL transport when it is installed, SIGHUP rotating the pair, ``--workers``."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from yarl import URL

from proxy.config import parse_config
from proxy.problems import ConfigError
from proxy.startonly import check_exposure
from tests.helpers import Echo
from tests.pki import CA, Leaf

PY = sys.executable
ROUTE = "routes:\n  - {prefix: /a/, upstream: '%s/base/', provider: v}\n"
PROVIDER = "providers:\n  v: {grant: static, token: tok-cli-tls-30c7}\n"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def tls_yaml(cert: Path, key: Path, extra: str = "", where: str = "listen") -> str:
    return (
        f"{where}:\n  host: 127.0.0.1\n  port: 0\n  tls:\n"
        f"    cert_file: {cert}\n    key_file: {key}\n{extra}"
    )


def refused(text: str, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "routes.yaml", {}, tmp_path)
    return err.value


def test_an_encrypted_key_is_refused_at_its_key_path(ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue()
    cert, key = leaf.write(tmp_path, "s")
    key.write_bytes(leaf.key_pem(password=b"pw-secret-1"))
    err = refused(tls_yaml(cert, key), tmp_path)
    assert err.path == "listen.tls.key_file" and "encrypted key" in err.problem


def test_a_key_of_another_certificate_is_refused(ca: CA, tmp_path: Path) -> None:
    cert, _ = ca.issue().write(tmp_path, "s")
    _, other = ca.issue().write(tmp_path, "o")
    err = refused(tls_yaml(cert, other, where="admin"), tmp_path)
    assert err.path == "admin.tls.key_file"
    assert "is not the key of the certificate" in err.problem


def test_an_expired_certificate_is_refused_with_its_date(ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue(days=-2)
    cert, key = leaf.write(tmp_path, "s")
    err = refused(tls_yaml(cert, key), tmp_path)
    day = leaf.cert.not_valid_after_utc.strftime("%Y-%m-%d")
    assert err.path == "listen.tls.cert_file" and f"expired on {day}" in err.problem


@pytest.mark.parametrize("broken", ["cert_file", "key_file", "client_ca_file"])
def test_missing_or_unreadable_files_are_refused(ca: CA, tmp_path: Path, broken: str) -> None:
    cert, key = ca.issue().write(tmp_path, "s")
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM at all\n")
    files = {"cert_file": cert, "key_file": key, "client_ca_file": ca.write(tmp_path / "ca")}
    files[broken] = junk
    text = "listen:\n  tls:\n" + "".join(f"    {k}: {v}\n" for k, v in files.items())
    assert refused(text, tmp_path).path == f"listen.tls.{broken}"
    files[broken] = tmp_path / "absent.pem"
    text = "listen:\n  tls:\n" + "".join(f"    {k}: {v}\n" for k, v in files.items())
    err = refused(text, tmp_path)
    assert err.path == f"listen.tls.{broken}" and "file not found" in err.problem


def test_a_certificate_identity_needs_client_certificates_asked_for(ca: CA, tmp_path: Path) -> None:
    cert, key = ca.issue().write(tmp_path, "s")
    clients = "clients:\n  - {id: bi, cert_subject: 'CN=bi-tool'}\n"
    err = refused(tls_yaml(cert, key) + clients, tmp_path)
    assert err.path == "clients[0].cert_subject" and "client_ca_file" in err.problem
    mtls = f"    client_ca_file: {ca.write(tmp_path / 'ca.crt')}\n"
    bad_dn = "clients:\n  - {id: bi, cert_subject: 'bi-tool'}\n"
    err = refused(tls_yaml(cert, key, mtls) + bad_dn, tmp_path)
    assert err.path == "clients[0].cert_subject" and "RFC 4514" in err.problem
    nothing = "clients:\n  - {id: bi}\n"
    assert refused(tls_yaml(cert, key, mtls) + nothing, tmp_path).path == "clients[0]"
    ok = parse_config(tls_yaml(cert, key, mtls) + clients, "r.yaml", {}, tmp_path)
    assert ok.config.clients[0].cert_subject == "CN=bi-tool"


def test_mutual_tls_alone_protects_an_open_listener(
    ca: CA, tmp_path: Path, echo: tuple[Echo, URL]
) -> None:
    cert, key = ca.issue().write(tmp_path, "s")
    rest = PROVIDER + ROUTE % echo[1]
    plain_tls = tls_yaml(cert, key).replace("127.0.0.1", "0.0.0.0", 1) + rest
    with pytest.raises(ConfigError) as err:
        check_exposure(parse_config(plain_tls, "r.yaml", {}, tmp_path))
    assert "listen.tls.client_ca_file (mutual TLS)" in err.value.problem
    mtls = f"    client_ca_file: {ca.write(tmp_path / 'ca.crt')}\n"
    text = tls_yaml(cert, key, mtls).replace("127.0.0.1", "0.0.0.0", 1) + rest
    check_exposure(parse_config(text, "r.yaml", {}, tmp_path))


def test_check_reports_the_certificate_expiry(ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue(days=40)
    cert, key = leaf.write(tmp_path, "s")
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(tls_yaml(cert, key))
    out = subprocess.run(
        [PY, "-m", "proxy", "check", "--config", str(cfg)], capture_output=True, text=True
    )
    day = leaf.cert.not_valid_after_utc.strftime("%Y-%m-%d")
    assert out.returncode == 0, out.stderr
    assert f"listen.tls: certificate {cert} expires {day}" in out.stdout
    assert "(in 39 days)" in out.stdout or "(in 40 days)" in out.stdout


# --- the real process


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, object]] = []

    async def read_until(self, event: str) -> dict[str, object]:
        assert self.proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"process ended before {event!r}: {self.lines}")
                try:
                    line: dict[str, object] = json.loads(raw)
                except ValueError:
                    continue
                self.lines.append(line)
                if line.get("event") == event:
                    return line


@pytest.fixture
async def served(
    ca: CA, tmp_path: Path, echo: tuple[Echo, URL]
) -> AsyncIterator[tuple[CA, Path, list[Process]]]:
    """Writes ``routes.yaml`` with a TLS listener; the test starts the process."""
    cert, key = ca.issue().write(tmp_path, "server")
    ca.write(tmp_path / "ca.crt")
    (tmp_path / "routes.yaml").write_text(tls_yaml(cert, key) + PROVIDER + ROUTE % echo[1])
    procs: list[Process] = []
    yield ca, tmp_path, procs
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def start(tmp_path: Path, procs: list[Process], *args: str) -> Process:
    proc = await asyncio.create_subprocess_exec(
        *(PY, "-m", "proxy", "--config", str(tmp_path / "routes.yaml"), "--port", "0", *args),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    p = Process(proc)
    procs.append(p)
    return p


async def run(*argv: str, stdin: bytes = b"") -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    return out.decode(errors="replace")


async def curl(url: URL, tmp_path: Path, *args: str) -> str:
    """The body curl gets, and its status code on a last line."""
    ca = str(tmp_path / "ca.crt")
    return await run("curl", "-sS", "--cacert", ca, "-w", "\n%{http_code}", *args, str(url))


async def s_client(port: int, tmp_path: Path) -> str:
    return await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-alpn", "http/1.1", "-CAfile", str(tmp_path / "ca.crt"), stdin=b"",
    )  # fmt: skip


def serial(leaf: Leaf) -> int:
    return int(leaf.cert.serial_number)


def served_serial(openssl_out: str) -> int:
    """``openssl x509 -serial`` pads to whole bytes (a leading 0): compare numbers."""
    return int(openssl_out.strip().removeprefix("serial="), 16)


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("openssl"), reason="no curl")
async def test_curl_and_s_client_over_tls_and_a_pair_rotated_by_sighup(
    served: tuple[CA, Path, list[Process]],
) -> None:
    ca, tmp_path, procs = served
    p = await start(tmp_path, procs)
    address = URL(str((await p.read_until("listening"))["address"]))
    assert address.scheme == "https" and address.port is not None
    out = await curl(address / "a/x", tmp_path)
    assert out.endswith("\n200") and "Bearer tok-cli-tls-30c7" in out
    assert '"https"' in out  # X-Forwarded-Proto as the upstream saw it
    chunked = ("-H", "Transfer-Encoding: chunked", "--data-binary", "x")  # aiohttp's path
    out = await curl(address / "a/x", tmp_path, *chunked)
    assert out.endswith("\n200") and "Bearer tok-cli-tls-30c7" in out and '"https"' in out
    reader, writer = await asyncio.open_connection("127.0.0.1", address.port)
    writer.write(b"GET /a/x HTTP/1.1\r\nHost: localhost\r\n\r\n")  # plain HTTP
    async with asyncio.timeout(10):  # the default head deadline is 30 s
        assert b"Bearer" not in await reader.read()
    writer.close()
    hello = await s_client(address.port, tmp_path)
    assert "ALPN protocol: http/1.1" in hello and "Verify return code: 0 (ok)" in hello
    leaf = ca.issue()
    leaf.write(tmp_path, "server")
    p.proc.send_signal(signal.SIGHUP)
    line = await p.read_until("listener certificate reloaded")
    assert line["listener"] == "listen"
    await p.read_until("reloaded")
    hello = await run(
        "openssl", "x509", "-noout", "-serial",
        stdin=(await s_client(address.port, tmp_path)).encode(),
    )  # fmt: skip
    assert served_serial(hello) == serial(leaf)
    assert (await curl(address / "a/y", tmp_path)).endswith("\n200")


@pytest.mark.skipif(not shutil.which("curl"), reason="no curl")
async def test_workers_serve_tls_from_the_config_file(
    served: tuple[CA, Path, list[Process]],
) -> None:
    _, tmp_path, procs = served
    p = await start(tmp_path, procs, "--workers", "2")
    line = await p.read_until("listening")
    await p.read_until("listening")
    address = URL(str(line["address"]))
    assert address.scheme == "https"
    for path in ("a/1", "a/2", "a/3"):
        out = await curl(address / path, tmp_path)
        assert out.endswith("\n200") and "Bearer tok-cli-tls-30c7" in out
