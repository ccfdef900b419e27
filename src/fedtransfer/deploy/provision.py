"""Setting up a deployment: test certificates and node keys, the Flower app that carries an
experiment, and the Flower processes (SuperLink, SuperNodes) with TLS and node authentication.

Each function does one step that ``fedtransfer deploy`` composes; the README's "Deploy across
machines" gives the same steps as commands. Flower's own programs do the networking; this
module only writes their inputs and starts them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtransfer.deploy.secure import SecureAggregation
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment.schema import ExperimentConfig

CONNECTION = "fedtransfer"
"""The name ``flwr`` knows the SuperLink by (in ``$FLWR_HOME/config.toml``)."""


@dataclass(frozen=True)
class Credentials:
    """Where :func:`make_credentials` put things: a CA, the SuperLink's certificate and key,
    and one authentication key pair per node (``node<I>``, ``node<I>.pub``)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, i: int) -> Path:
        return self.folder / f"node{i}"

    def node_public_keys(self) -> list[Path]:
        return sorted(self.folder.glob("node*.pub"), key=lambda p: int(p.stem[4:]))


def make_credentials(
    folder: str | os.PathLike[str],
    *,
    nodes: int = 3,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 30,
) -> Credentials:
    """Test credentials: a self-signed CA, a SuperLink certificate for ``hosts`` (add the
    server's name or address when clients connect from other machines), and ``nodes`` EC
    P-384 node keys in OpenSSH format. For production, use your own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem, plain = serialization.Encoding.PEM, serialization.NoEncryption()

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer_key: ec.EllipticCurvePrivateKey,
        issuer: str,
        ca: bool,
    ) -> x509.Certificate:
        name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    creds = Credentials(out)
    creds.ca.write_bytes(
        cert("fedtransfer test CA", ca_key, ca_key, "fedtransfer test CA", True).public_bytes(pem)
    )
    creds.server_cert.write_bytes(
        cert(hosts[0], server_key, ca_key, "fedtransfer test CA", False).public_bytes(pem)
    )
    _private(
        creds.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain)
    )
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _private(
            creds.node_key(i), key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain)
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        (out / f"node{i}.pub").write_bytes(public + f" node{i}\n".encode())
    return creds


def _private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def write_app(
    config: ExperimentConfig,
    folder: str | os.PathLike[str],
    *,
    arm: str,
    out_dir: str | os.PathLike[str],
    threads: int = 1,
    timeout: float = 300.0,
    eval_every: int = 0,
    secure: SecureAggregation | None = None,
) -> Path:
    """A Flower app in ``folder`` that runs ``arm`` of ``config`` (bundled as
    ``experiment.yaml``) with ``flwr run``; the server writes to ``out_dir`` on its machine.
    ``secure`` aggregates every round with SecAgg+ (checked before round 1)."""
    config.arm(arm)  # refuses an arm the configuration does not have
    root = Path(folder)
    package = root / "fedtransfer_app"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""A fedtransfer experiment as a Flower app."""\n')
    (package / "experiment.yaml").write_text(cfgio.to_yaml(config))
    (package / "apps.py").write_text(
        '"""The Flower apps of the bundled experiment (written by fedtransfer deploy)."""\n\n'
        "from pathlib import Path\n\n"
        "from fedtransfer.deploy.flower import client_app, server_app\n\n"
        'CONFIG = Path(__file__).with_name("experiment.yaml")\n'
        "server = server_app(CONFIG)\n"
        f"client = client_app(CONFIG, secure={secure is not None})\n"
    )
    settings = {
        "arm": json.dumps(arm),
        "out-dir": json.dumps(str(Path(out_dir).resolve())),
        "threads": str(int(threads)),
        "timeout": repr(float(timeout)),
        "eval-every": str(int(eval_every)),
        "secure": "true" if secure is not None else "false",
    }
    if secure is not None:
        settings.update(
            {
                "secure-num-shares": repr(float(secure.num_shares)),
                "secure-threshold": repr(float(secure.reconstruction_threshold)),
                "secure-quantization-range": str(secure.quantization_range),
                "secure-modulus-range": str(secure.modulus_range),
            }
        )
    (root / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        f'name = "fedtransfer-{_slug(config.name)}"\n'
        'version = "1.0.0"\n'
        f'description = "fedtransfer experiment {config.name}, arm {arm}"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []  # fedtransfer and flwr come from the environment\n\n"
        "[tool.hatch.build.targets.wheel]\n"
        'packages = ["."]\n\n'
        "[tool.flwr.app]\n"
        'publisher = "fedtransfer"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "fedtransfer_app.apps:server"\n'
        'clientapp = "fedtransfer_app.apps:client"\n\n'
        "[tool.flwr.app.config]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    )
    return root


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


def flower_program(name: str) -> str:
    """The path of a Flower program installed beside this Python (``flower-superlink`` …)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FedTransferError(
            f"deploy: the Flower program {name!r} is not installed; hint: pip install "
            '"fedtransfer[deploy]" (flwr) in this environment'
        )
    return found


def flower_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """The environment for a Flower process whose state lives in ``home``; Flower's programs
    start helpers (``flower-superexec``) by name, so their folder leads ``PATH``."""
    bin_dir = str(Path(flower_program("flower-superlink")).parent)
    Path(home).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(Path(home).resolve()),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def superlink_command(
    creds: Credentials, *, address: str, database: str | os.PathLike[str]
) -> list[str]:
    """``flower-superlink`` with TLS, node authentication on, and no dependency installs."""
    host, port = split_address(address)
    return [
        flower_program("flower-superlink"),
        "--ssl-ca-certfile", str(creds.ca.resolve()),
        "--ssl-certfile", str(creds.server_cert.resolve()),
        "--ssl-keyfile", str(creds.server_key.resolve()),
        "--enable-supernode-auth",
        "--database", str(Path(database).resolve()),
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]  # fmt: skip


def supernode_command(
    *,
    superlink: str,
    ca: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    partition: int,
    num_partitions: int,
    port: int,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` for client ``partition``: TLS against ``ca`` and authenticated by
    ``key``; ``ca=None`` connects in plaintext (refused by a TLS SuperLink)."""
    cmd = [flower_program("flower-supernode"), "--superlink", superlink]
    cmd += ["--root-certificates", str(Path(ca).resolve())] if ca else ["--insecure"]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
    cmd += [
        "--node-config", f"partition-id={partition} num-partitions={num_partitions}",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedTransferError(f"deploy: address {address!r} is not HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def write_connection(home: str | os.PathLike[str], *, address: str, ca: Path) -> None:
    """Tell ``flwr`` (with ``FLWR_HOME=home``) where the SuperLink is and which CA signs it."""
    folder = Path(home)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca.resolve()}"\n'
    )


def flwr(home: str | os.PathLike[str], *args: str, timeout: float = 120) -> str:
    """Run the ``flwr`` command line with ``FLWR_HOME=home``; its output, or an error."""
    done = subprocess.run(
        [flower_program("flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise FedTransferError(
            f"deploy: flwr {' '.join(args)} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def wait_healthy(address: str, ca: Path, *, timeout: float = 60.0) -> None:
    """Wait until the SuperLink at ``address`` answers its health check over TLS."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise FedTransferError(
                    f"deploy: the SuperLink at {address} did not come up in {timeout:.0f} s "
                    f"({exc}); see its log"
                ) from None
            time.sleep(0.5)


def online_nodes(home: str | os.PathLike[str]) -> int:
    """How many SuperNodes the SuperLink reports online."""
    listing = json.loads(flwr(home, "supernode", "ls", CONNECTION, "--format", "json"))
    return sum(n.get("status") == "online" for n in listing.get("nodes", []))
