"""The ``fedtransfer`` command: run, pretrain, resume, report, partition. Only the CLI prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtransfer.data.files import DATA_ENV, DOWNLOAD_ENV
from fedtransfer.errors import ConfigError, FedTransferError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import report
from fedtransfer.experiment.run import (
    build_population,
    load_config,
    new_run_dir,
    resume,
    run_experiment,
)
from fedtransfer.runtime import (
    AutoRuntime,
    ProcessRuntime,
    RayRuntime,
    Runtime,
    SerialRuntime,
    VectorizedRuntime,
)
from fedtransfer.transfer.pretrain import pretrain

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 120)  # logs and CI: keep the summary table unwrapped


class _Display:
    """Progress bar, one line per round, and the closing table."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("rounds", total=None)

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event == "pretrain_start":
            console.print(f"pre-training on {payload['source'].get('kind')} …")
        elif event == "pretrain_done":
            m = payload.get("metrics", {})
            acc = m.get("holdout_accuracy")
            extra = f", source hold-out accuracy {acc:.3f}" if acc is not None else ""
            console.print(f"pre-trained checkpoint sha256 {payload['sha256'][:16]}…{extra}")
        elif event == "arm_start":
            self.progress.start()
            total = payload["rounds"] * payload["arms"]
            self.progress.update(self.task, description=payload["arm"], total=total)
            self.progress.advance(self.task, payload["round"])
        elif event == "round":
            r = payload
            console.print(
                f"[cyan]{r['arm']:>16}[/] round {r['round']:>3}  acc {r['accuracy']:.3f}  "
                f"p10 {r['client_accuracy_p10']:.3f}  ↑{r['bytes_up'] / 1e6:.3f} MB  "
                f"↓{r['bytes_down'] / 1e6:.3f} MB  {r['seconds']:.2f} s"
                + (f"  [red]{r['rejected']} rejected[/]" if r["rejected"] else "")
            )
            self.progress.advance(self.task)
        elif event == "done":
            self.progress.stop()
            print_summary(payload["summary"])
            console.print(f"report: [bold]{payload['report']}[/]")


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['name']}: target accuracy {summary['target_accuracy']:.0%}")
    for h in report.HEADERS:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for row in report.summary_rows(summary):
        table.add_row(*row)
    console.print(table)


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
            help="override a config value, e.g. --set rounds=40 --set arms.scratch.local.lr=0.1",
        )

    def with_runtime(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--runtime",
            choices=("serial", "process", "ray", "vectorized", "auto"),
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
        "--retries",
        type=int,
        default=20,
        help="restart a node the server refuses at once (started too early; default 20)",
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
        return _dispatch(args)
    except FedTransferError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; finished rounds are checkpointed: `fedtransfer resume RUN_DIR`")
        return 130


@contextlib.contextmanager
def _runtime(args: argparse.Namespace) -> Iterator[Runtime]:
    """The runtime the options ask for, stopping its workers at the end; ``--threads`` holds
    for the command and the thread count before it is restored afterwards."""
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if args.workers is not None and args.runtime not in ("process", "ray"):
        raise ConfigError("--workers: needs --runtime process or --runtime ray")
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.runtime == "process":
            with ProcessRuntime(workers=args.workers, threads=args.threads) as pool:
                yield pool
        elif args.runtime == "ray":
            with RayRuntime(num_actors=args.workers, threads=args.threads) as actors:
                yield actors
        elif args.runtime == "vectorized":
            yield VectorizedRuntime()
        elif args.runtime == "auto":
            yield AutoRuntime()
        else:
            yield SerialRuntime()
    finally:
        torch.set_num_threads(before)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        cfg = load_config(args.config, args.set)
        with _runtime(args) as runtime:
            run_dir = new_run_dir(args.runs_dir, args.name or cfg.name, overwrite=args.overwrite)
            console.print(f"run directory: [bold]{run_dir}[/]")
            run_experiment(cfg, run_dir, observer=_Display(), runtime=runtime)
    elif args.command == "bench":
        from fedtransfer.experiment.bench import rewrite_report, run_transfer_bench

        if args.report:
            path = rewrite_report(
                args.bench_name,
                configs=Path(args.configs),
                out=Path(args.out),
                runs_dir=Path(args.runs_dir),
            )
            console.print(f"report: [bold]{path}[/]")
            return 0
        with _runtime(args) as runtime:
            run_transfer_bench(
                args.bench_name,
                configs=Path(args.configs),
                seeds=args.seeds,
                runs_dir=Path(args.runs_dir),
                out=Path(args.out),
                overrides=args.set,
                runtime=runtime,
                log=console.print,
            )
    elif args.command == "resume":
        with _runtime(args) as runtime:
            resume(args.run_dir, observer=_Display(), runtime=runtime)
    elif args.command == "report":
        path = report.write_report(args.run_dir)
        print_summary(json.loads((Path(args.run_dir) / "summary.json").read_text()))
        console.print(f"report: [bold]{path}[/]")
    elif args.command == "pretrain":
        cfg = load_config(args.config, args.set)
        pc = cfg.pretrain
        from fedtransfer.seeding import derive_seed

        ck = pretrain(
            cfg.model.init(derive_seed(cfg.seed, "pretrain-init")),
            pc.source.load(),
            spec=pc.spec(),
            seed=cfg.seed,
            out_dir=args.out,
            provenance={"source": cfgio.dump(pc.source), "model": cfgio.dump(cfg.model)},
        )
        console.print_json(
            json.dumps(
                {
                    "checkpoint": str(ck.path),
                    "sha256": ck.sha256,
                    "metrics": ck.provenance["metrics"],
                }
            )
        )
        console.print(
            f"use it with: --set pretrain.checkpoint={ck.path} --set pretrain.sha256={ck.sha256}"
        )
    elif args.command == "partition":
        cfg = load_config(args.config, args.set)
        stats = report.partition_stats(build_population(cfg))
        table = Table(title=f"{cfg.data.partition!r} over {cfg.data.num_clients} clients")
        for h in ("client", "train", "test", "classes", "label histogram"):
            table.add_column(h)
        for row in zip(
            stats["clients"],
            stats["train_sizes"],
            stats["test_sizes"],
            stats["classes_per_client"],
            stats["label_counts"],
            strict=True,
        ):
            table.add_row(row[0], str(row[1]), str(row[2]), str(row[3]), " ".join(map(str, row[4])))
        console.print(table)
        if args.out:
            path = report.write_partition(stats, args.out)
            console.print(f"partition report: [bold]{path}[/]")
    elif args.command == "deploy":
        return _deploy(args)
    elif args.command == "config":
        console.print(
            cfgio.to_yaml(load_config(args.config, args.set)), highlight=False, markup=False
        )
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from fedtransfer.deploy.commands import client_process, run_server
    from fedtransfer.deploy.provision import Credentials, make_credentials
    from fedtransfer.deploy.secure import SecureAggregation

    if args.deploy_command == "certs":
        creds = make_credentials(
            args.folder, nodes=args.nodes, hosts=("localhost", "127.0.0.1", "::1", *args.host)
        )
        console.print(
            f"CA, server certificate and {args.nodes} node keys in [bold]{creds.folder}[/]"
        )
        return 0
    cfg = load_config(args.config, args.set)
    creds = Credentials(Path(args.certs))
    if not creds.ca.is_file():
        raise ConfigError(
            f"--certs {args.certs}: no ca.crt there; hint: fedtransfer deploy certs {args.certs}"
        )
    if args.deploy_command == "server":
        arm = args.arm or next((a.name for a in cfg.arms if a.mode == "federated"), "")
        done = run_server(
            cfg,
            arm=arm,
            creds=creds,
            address=args.address,
            run_dir=args.run_dir,
            threads=args.threads,
            timeout=args.timeout,
            eval_every=args.eval_every,
            secure=SecureAggregation(quantization_range=args.secure_quantization_range)
            if args.secure
            else None,
            say=console.print,
        )
        console.print(f"run {done.run_id}: {done.status}; results in [bold]{done.run_dir}[/]")
        last = (done.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
        console.print_json(last)
        return 0
    if not 0 <= args.partition < cfg.data.num_clients:
        raise ConfigError(
            f"--partition {args.partition}: the configuration has {cfg.data.num_clients} "
            f"clients, so 0..{cfg.data.num_clients - 1}"
        )
    code = 0
    for attempt in range(args.retries + 1):
        began = time.monotonic()
        node = client_process(
            superlink=args.superlink,
            creds=creds,
            partition=args.partition,
            num_partitions=cfg.data.num_clients,
            port=args.port or 9100 + args.partition,
            home=args.home or f"runs/deploy-client-{args.partition}",
        )
        code = node.wait()
        if code == 0 or time.monotonic() - began > 60 or attempt == args.retries:
            break
        # refused at once (the server not up yet, or its node keys not yet registered): retry
        console.print(f"client {args.partition}: the SuperLink refused it (exit {code}); retrying")
        time.sleep(3.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
