"""Setting a deployment up: credentials that verify, the Flower app that carries an
experiment, and the commands' errors (no Flower process is started here)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedtransfer.cli import main
from fedtransfer.deploy.provision import (
    Credentials,
    make_credentials,
    split_address,
    supernode_command,
    write_app,
)
from fedtransfer.deploy.secure import SecureAggregation
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment.run import load_config


def test_credentials_chain_to_the_ca_and_cover_the_hosts(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path, nodes=2, hosts=("localhost", "127.0.0.1", "fl.example"))
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert [p.name for p in creds.node_public_keys()] == ["node0.pub", "node1.pub"]
    key = load_ssh_private_key(creds.node_key(1).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert creds.node_key(0).stat().st_mode & 0o077 == 0  # private keys are the owner's only
    assert (tmp_path / "node1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_write_app_bundles_the_experiment_and_the_run_settings(tmp_path: Path) -> None:
    cfg = load_config(None, ["rounds=2"])
    app = write_app(
        cfg,
        tmp_path / "app",
        arm="pretrained-full",
        out_dir=tmp_path / "out",
        secure=SecureAggregation(quantization_range=2**20),
    )
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    flwr = meta["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "fedtransfer_app.apps:server",
        "clientapp": "fedtransfer_app.apps:client",
    }
    assert flwr["config"]["arm"] == "pretrained-full" and flwr["config"]["secure"] is True
    assert flwr["config"]["secure-quantization-range"] == 2**20
    assert Path(flwr["config"]["out-dir"]).is_absolute()
    bundled = load_config(app / "fedtransfer_app" / "experiment.yaml")
    assert bundled == cfg
    assert "secure=True" in (app / "fedtransfer_app" / "apps.py").read_text()
    with pytest.raises(FedTransferError, match="arm 'nope' is not in the configuration"):
        write_app(cfg, tmp_path / "other", arm="nope", out_dir=tmp_path)


def test_addresses_and_plaintext_nodes(tmp_path: Path) -> None:
    assert split_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(FedTransferError, match="not HOST:PORT"):
        split_address("localhost")
    plain = supernode_command(
        superlink="127.0.0.1:1", ca=None, key=None, partition=0, num_partitions=1, port=2
    )
    assert "--insecure" in plain and "--auth-supernode-private-key" not in plain
    secure = supernode_command(
        superlink="127.0.0.1:1",
        ca=tmp_path / "ca.crt",
        key=tmp_path / "node0",
        partition=2,
        num_partitions=3,
        port=2,
    )
    assert "--insecure" not in secure
    assert secure[secure.index("--node-config") + 1] == "partition-id=2 num-partitions=3"


def test_deploy_commands_check_their_inputs(tmp_path: Path) -> None:
    assert main(["deploy", "certs", str(tmp_path / "c"), "--nodes", "1"]) == 0
    assert Credentials(tmp_path / "c").ca.is_file()
    assert main(["deploy", "server", "--certs", str(tmp_path / "missing")]) == 2
    assert main(["deploy", "client", "--certs", str(tmp_path / "c"), "--partition", "99"]) == 2
    cfg = ["--set", "aggregator={kind: mean}"]
    assert main(["deploy", "server", *cfg, "--certs", str(tmp_path / "c"), "--secure"]) == 2
