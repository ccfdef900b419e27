"""Wire fuzzing, the full run: seeded mutations of a real update for every codec, each read as
the server reads an update (``Payload.from_bytes`` ▸ ``codec.decode(payload, expected)`` ▸
``validate_update``), counted as refused (a ``PayloadError`` or ``UpdateRejected``), accepted
(still a valid update: a flipped bit in a value) or other (any other exception: a bug).

    .venv/bin/python benchmarks/fuzz.py                 # 10,000 per codec
    .venv/bin/python benchmarks/fuzz.py --per-codec 500 # a quick look

Writes ``benchmarks/results/fuzz.md`` and ``fuzz.json`` (with the peak RSS of the process).
The seeded 2,000-per-codec version runs in ``make test`` (``tests/codecs/test_fuzz.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from machine import git_commit, machine_info, machine_section

from fedtransfer.codecs import BFloat16, Exact, Float16, Float32, Int8, TopK
from fedtransfer.codecs.mutate import MUTATIONS, fuzz
from fedtransfer.models import CNN
from fedtransfer.transfer import Full

RESULTS = Path(__file__).resolve().parent / "results"
CODECS = [Float32(), Exact(), Float16(), BFloat16(), Int8(), Int8("channel"), TopK(0.01)]


def _update() -> dict[str, torch.Tensor]:
    """A CNN update of the default experiment's model: every shared key of the plan."""
    model = CNN()()
    plan = Full().plan(model)
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=gen) * 0.01 if v.is_floating_point() else v * 0 + 1
        for k, v in model.state_dict().items()
        if k in plan.shared
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-codec", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    update = _update()
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    for codec in CODECS:
        t0 = time.perf_counter()
        got = fuzz(codec, update, count=args.per_codec, seed=args.seed)
        rows.append({"codec": repr(codec), **got, "seconds": time.perf_counter() - t0})
        print(
            f"{codec!r:55} tried {got['tried']:6d} rejected {got['rejected']:6d} accepted "
            f"{got['accepted']:5d} other {got['other']}",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "command": "python benchmarks/fuzz.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_info(),
        "per_codec": args.per_codec,
        "seed": args.seed,
        "mutations": list(MUTATIONS),
        "update_keys": len(update),
        "update_bytes": sum(v.numel() * v.element_size() for v in update.values()),
        "rows": rows,
        "peak_rss_bytes": peak,
        "seconds": time.perf_counter() - began,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "fuzz.md").write_text(_markdown(result))
    others = sum(r["other"] for r in rows)
    print(f"wrote {RESULTS / 'fuzz.md'}: {others} other exceptions")
    return 1 if others else 0


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Wire fuzzing: every malformed payload refused cleanly",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        f"{result['per_codec']:,} seeded mutations (seed {result['seed']}) of one real update "
        f"(the default CNN's {result['update_keys']} shared tensors, "
        f"{result['update_bytes']:,} bytes) per codec, cycling through: "
        + ", ".join(f"`{k}`" for k in result["mutations"])
        + ". Each is read as the server reads an update: `Payload.from_bytes` ▸ "
        "`codec.decode(payload, expected)` ▸ `validate_update`. *Rejected*: a `PayloadError` "
        "or `UpdateRejected`; *accepted*: still a valid update (a flipped bit in a value, "
        "which the server cannot tell from training); *other*: any other exception.",
        "",
        "| codec | tried | rejected | accepted | other | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['codec']}` | {r['tried']:,} | {r['rejected']:,} | {r['accepted']:,} | "
            f"{r['other']} | {r['seconds']:.1f} |"
        )
    total = {
        k: sum(r[k] for r in result["rows"]) for k in ("tried", "rejected", "accepted", "other")
    }
    lines += [
        f"| **all** | {total['tried']:,} | {total['rejected']:,} | {total['accepted']:,} | "
        f"{total['other']} | {result['seconds']:.1f} |",
        "",
        f"Peak RSS of the whole run: {result['peak_rss_bytes'] / 2**20:.0f} MiB.",
        "",
        *machine_section(result),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
