"""The ``fedtransfer`` command: run, pretrain, resume, report, partition. Only the CLI prints."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedtransfer.data.files import DATA_ENV, DOWNLOAD_ENV
from fedtransfer.errors import ConfigError, FedTransferError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import registry, report
from fedtransfer.experiment.display import RunDisplay, console, print_partition, print_summary
from fedtransfer.experiment.run import (
    build_population,
    load_config,
    new_run_dir,
    resume,
    run_experiment,
)
from fedtransfer.runtime import Runtime
from fedtransfer.seeding import derive_seed
from fedtransfer.transfer.pretrain import pretrain


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtransfer", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument(
        "--data-dir",
        help=f"the data directory the dataset loaders read (default: ${DATA_ENV}, else ./data)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download missing dataset files (checked against their published checksums)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help="YAML experiment file (default: built-in demo)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set rounds=40 --set arms.scratch.training.lr=0.1",
        )

    def with_runtime(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--runtime",
            choices=tuple(registry.RUNTIMES),
            default="serial",
            help="where client updates run: this process one client at a time (serial, the "
            "default), worker processes, or Ray actors — results identical at the same "
            "--threads — or a whole cohort at once with torch.func (vectorized; auto: only for "
            "small models without trainable convolutions), equal to serial within float "
            "rounding",
        )
        sp.add_argument(
            "--workers",
            type=int,
            help="worker processes or Ray actors (default: usable CPUs / threads)",
        )
        sp.add_argument(
            "--threads", type=int, help="torch threads, here and in each worker (default: torch's)"
        )

    run = sub.add_parser("run", help="run an experiment (default: the offline demo)")
    with_config(run)
    run.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    run.add_argument("--name", help="run directory name (default: the config's name)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    with_runtime(run)

    pre = sub.add_parser("pretrain", help="pre-train centrally and write a checkpoint")
    with_config(pre)
    pre.add_argument("--out", default="checkpoints/pretrained", help="checkpoint folder")

    res = sub.add_parser("resume", help="continue a stopped run")
    res.add_argument("run_dir")
    with_runtime(res)

    rep = sub.add_parser("report", help="rewrite report.md and plots of a finished run")
    rep.add_argument("run_dir")

    part = sub.add_parser("partition", help="show how the config partitions its data")
    with_config(part)
    part.add_argument("--out", help="also write partition.json and a histogram plot here")

    bench = sub.add_parser("bench", help="benchmarks: run a config over seeds and report")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    transfer = bench_sub.add_parser(
        "transfer",
        help="pre-trained vs scratch over seeds: configs/NAME.yaml -> benchmarks/results/NAME.md",
    )
    transfer.add_argument("bench_name", metavar="NAME", help="e.g. femnist (configs/femnist.yaml)")
    transfer.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    transfer.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the config"
    )
    transfer.add_argument("--configs", default="configs", help="config folder (default: configs)")
    transfer.add_argument(
        "--out", default="benchmarks/results", help="report folder (default: benchmarks/results)"
    )
    transfer.add_argument(
        "--runs-dir", default="runs/bench", help="run directories (default: runs/bench)"
    )
    transfer.add_argument(
        "--report", action="store_true", help="only rewrite NAME.md from the recorded NAME.json"
    )
    with_runtime(transfer)

    dep = sub.add_parser("deploy", help="run an arm across machines on Flower's deployment engine")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)
    certs = dep_sub.add_parser("certs", help="write a test CA, server certificate and node keys")
    certs.add_argument("folder")
    certs.add_argument("--nodes", type=int, default=3, help="node key pairs (default 3)")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="server name or IP the certificate covers "
        "(repeatable; localhost, 127.0.0.1 and ::1 always)",
    )
    server = dep_sub.add_parser("server", help="start the SuperLink and run one arm")
    with_config(server)
    server.add_argument("--certs", required=True, help="folder from `deploy certs`")
    server.add_argument("--arm", help="the arm to run (default: the first federated one)")
    server.add_argument("--address", default="127.0.0.1:9092", help="HOST:PORT to serve on")
    server.add_argument("--run-dir", default="runs/deploy", help="where results go")
    server.add_argument("--threads", type=int, default=1, help="torch threads per process")
    server.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for clients")
    server.add_argument("--eval-every", type=int, default=0, help="also evaluate every N rounds")
    server.add_argument(
        "--secure",
        action="store_true",
        help="aggregate with SecAgg+ (needs the norm_bound aggregator: its bound is the "
        "clipping range)",
    )
    server.add_argument(
        "--secure-quantization-range", type=int, default=2**22, help="SecAgg+ levels (2^22)"
    )
    client = dep_sub.add_parser("client", help="start the SuperNode of one client")
    with_config(client)
    client.add_argument("--partition", type=int, required=True, help="this client's index")
    client.add_argument("--certs", required=True, help="folder with ca.crt and node<I>")
    client.add_argument("--superlink", default="127.0.0.1:9092", help="the server's HOST:PORT")
    client.add_argument("--port", type=int, help="local port for its apps (default 9100 + I)")
    client.add_argument("--home", help="Flower state folder (default runs/deploy-client-I)")
    client.add_argument(
        "--reconnect-for",
        type=float,
        default=600.0,
        help="keep restarting a node that exits with an error (the server not up, restarted "
        "or gone) for this many seconds in all, backing off to 30 s (default 600)",
    )

    show = sub.add_parser("config", help="print the resolved configuration as YAML")
    with_config(show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.data_dir is not None:  # read by every loader, here and in worker processes
        os.environ[DATA_ENV] = args.data_dir
    if args.download:
        os.environ[DOWNLOAD_ENV] = "1"
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[_command(args)](args)
    except FedTransferError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; finished rounds are checkpointed: `fedtransfer resume RUN_DIR`")
        return 130
    except OSError as exc:  # the disk, not the configuration: say which file and what to do
        hint = "free some space" if exc.errno == errno.ENOSPC else "check the path"
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(
            f"[bold red]error:[/] {where}{exc.strerror or exc}; hint: {hint}, then `fedtransfer "
            "resume RUN_DIR` (finished rounds are kept)",
            highlight=False,
            soft_wrap=True,
        )
        return 2


def _command(args: argparse.Namespace) -> str:
    """The command's key in :data:`COMMANDS`: ``run``, or with its subcommand ``deploy certs``."""
    sub = getattr(args, f"{args.command}_command", None)
    return args.command if sub is None else f"{args.command} {sub}"


@contextlib.contextmanager
def _runtime(args: argparse.Namespace) -> Iterator[Runtime]:
    """The runtime the options ask for, stopping its workers at the end; ``--threads`` holds
    for the command and the thread count before it is restored afterwards."""
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if args.workers is not None and args.runtime not in registry.POOLED_RUNTIMES:
        pools = " or ".join(f"--runtime {name}" for name in registry.POOLED_RUNTIMES)
        raise ConfigError(f"--workers: needs {pools}")
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with registry.runtime(args.runtime, workers=args.workers, threads=args.threads) as rt:
            yield rt
    finally:
        torch.set_num_threads(before)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    with _runtime(args) as runtime:
        run_dir = new_run_dir(args.runs_dir, args.name or cfg.name, overwrite=args.overwrite)
        console.print(f"run directory: [bold]{run_dir}[/]")
        run_experiment(cfg, run_dir, observer=RunDisplay(), runtime=runtime)
    return 0


def _cmd_bench_transfer(args: argparse.Namespace) -> int:
    from fedtransfer.experiment.bench import rewrite_report, run_transfer_bench

    folders = {"configs": Path(args.configs), "out": Path(args.out)}
    if args.report:
        path = rewrite_report(args.bench_name, runs_dir=Path(args.runs_dir), **folders)
        console.print(f"report: [bold]{path}[/]")
        return 0
    with _runtime(args) as runtime:
        run_transfer_bench(
            args.bench_name,
            seeds=args.seeds,
            runs_dir=Path(args.runs_dir),
            overrides=args.set,
            runtime=runtime,
            log=console.print,
            **folders,
        )
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    with _runtime(args) as runtime:
        resume(args.run_dir, observer=RunDisplay(), runtime=runtime)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    path = report.write_report(args.run_dir)
    print_summary(json.loads((Path(args.run_dir) / "summary.json").read_text()))
    console.print(f"report: [bold]{path}[/]")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    pc = cfg.pretrain
    ck = pretrain(
        cfg.model.init(derive_seed(cfg.seed, "pretrain-init")),
        pc.source.load(),
        spec=pc.spec(),
        seed=cfg.seed,
        out_dir=args.out,
        provenance={"source": cfgio.dump(pc.source), "model": cfgio.dump(cfg.model)},
    )
    made = {"checkpoint": str(ck.path), "sha256": ck.sha256, "metrics": ck.provenance["metrics"]}
    console.print_json(json.dumps(made))
    console.print(
        f"use it with: --set pretrain.checkpoint={ck.path} --set pretrain.sha256={ck.sha256}"
    )
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    stats = report.partition_stats(build_population(cfg))
    print_partition(stats, f"{cfg.data.partition!r} over {cfg.data.num_clients} clients")
    if args.out:
        path = report.write_partition(stats, args.out)
        console.print(f"partition report: [bold]{path}[/]")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    console.print(cfgio.to_yaml(load_config(args.config, args.set)), highlight=False, markup=False)
    return 0


def _cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedtransfer.deploy.provision import make_credentials

    creds = make_credentials(
        args.folder, nodes=args.nodes, hosts=("localhost", "127.0.0.1", "::1", *args.host)
    )
    console.print(f"CA, server certificate and {args.nodes} node keys in [bold]{creds.folder}[/]")
    return 0


def _deployment(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configuration and the credentials of ``deploy server`` and ``deploy client``."""
    from fedtransfer.deploy.provision import Credentials

    cfg = load_config(args.config, args.set)
    creds = Credentials(Path(args.certs))
    if not creds.ca.is_file():
        raise ConfigError(
            f"--certs {args.certs}: no ca.crt there; hint: fedtransfer deploy certs {args.certs}"
        )
    return cfg, creds


def _cmd_deploy_server(args: argparse.Namespace) -> int:
    from fedtransfer.deploy.commands import run_server
    from fedtransfer.deploy.secure import SecureAggregation

    cfg, creds = _deployment(args)
    arm = args.arm or next((a.name for a in cfg.arms if a.mode == "federated"), "")
    levels = args.secure_quantization_range
    secure = SecureAggregation(quantization_range=levels) if args.secure else None
    done = run_server(
        cfg,
        arm=arm,
        creds=creds,
        address=args.address,
        run_dir=args.run_dir,
        threads=args.threads,
        timeout=args.timeout,
        eval_every=args.eval_every,
        secure=secure,
        say=console.print,
    )
    console.print(f"run {done.run_id}: {done.status}; results in [bold]{done.run_dir}[/]")
    last = (done.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    console.print_json(last)
    return 0


def _cmd_deploy_client(args: argparse.Namespace) -> int:
    from fedtransfer.deploy.commands import client_process, reconnecting

    cfg, creds = _deployment(args)
    if not 0 <= args.partition < cfg.data.num_clients:
        raise ConfigError(
            f"--partition {args.partition}: the configuration has {cfg.data.num_clients} "
            f"clients, so 0..{cfg.data.num_clients - 1}"
        )

    def node() -> subprocess.Popen[bytes]:
        return client_process(
            superlink=args.superlink,
            creds=creds,
            partition=args.partition,
            num_partitions=cfg.data.num_clients,
            port=args.port or 9100 + args.partition,
            home=args.home or f"runs/deploy-client-{args.partition}",
        )

    say = lambda line: console.print(f"client {args.partition}: {line}")  # noqa: E731
    return reconnecting(node, budget=args.reconnect_for, say=say)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "pretrain": _cmd_pretrain,
    "resume": _cmd_resume,
    "report": _cmd_report,
    "partition": _cmd_partition,
    "bench transfer": _cmd_bench_transfer,
    "deploy certs": _cmd_deploy_certs,
    "deploy server": _cmd_deploy_server,
    "deploy client": _cmd_deploy_client,
    "config": _cmd_config,
}
"""Each command of :func:`_parser` (with its subcommand) → the function that runs it."""


if __name__ == "__main__":
    sys.exit(main())
