"""Decoding allocates no more than the update it should be: a payload claiming a tensor the
receiver does not have, or more elements than its own, is refused before anything is
allocated for it (the 8 MiB TopK "bomb" claiming a 2^30-element tensor once made decode
allocate 4 GiB), and a real update decodes within 2x the larger of the payload and the update
(Int8 and Float16 once went through whole-tensor float64 temporaries, 26x and 14x).

Measured in a subprocess, by the kernel's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before each decode)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="peak-RSS measurement needs Linux's /proc/self/clear_refs",
)

MiB = 1 << 20

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from fedtransfer.codecs import Entry, Float16, Int8, Payload, TopK
    from fedtransfer.errors import PayloadError

    torch.set_num_threads(1)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def peak_of(decode):
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        try:
            decode()
            refused = None
        except PayloadError as exc:
            refused = str(exc)
        return status("VmHWM") - base, refused

    expected = {"w": torch.zeros(1024, 1024)}  # 1 Mi elements, 4 MiB
    n, ratio = 1 << 30, 0.001  # about 2^20 values and indices: the 8.2 MiB bomb
    k = TopK(ratio).num_kept(n)
    values, indices = torch.zeros(k), torch.arange(k, dtype=torch.int32)
    bombs = {
        # a key the plan does not have, and a known key claiming 2^30 elements
        "topk-unknown-key": (TopK(ratio), Payload("topk", (
            Entry("huge", values, {"shape": [n]}), Entry("huge#indices", indices),
        ), {"ratio": ratio})),
        "topk-oversized": (TopK(ratio), Payload("topk", (
            Entry("w", values, {"shape": [1 << 15, 1 << 15]}), Entry("w#indices", indices),
        ), {"ratio": ratio})),
    }
    codes = torch.zeros(8 * 1024 * 1024, dtype=torch.uint8)  # 8 MiB of codes
    rng = torch.tensor([[0.0, 1.0]])
    for key in ("huge", "w"):
        shape = [8 * 1024 * 1024] if key == "huge" else [4096, 2048]
        bombs[f"int8-{'unknown-key' if key == 'huge' else 'oversized'}"] = (Int8(), Payload(
            "int8", (Entry(key, codes.reshape(shape), {"dtype": "float32"}),
                     Entry(key + "#range", rng)), {"granularity": "tensor"}))
        bombs[f"float16-{'unknown-key' if key == 'huge' else 'oversized'}"] = (Float16(), Payload(
            "float16", (Entry(key, torch.zeros(shape, dtype=torch.float16),
                              {"dtype": "float32", "exp": 0}),)))
    out = {}
    for name, (codec, payload) in bombs.items():
        data = payload.to_bytes()
        parsed = Payload.from_bytes(data)
        peak, refused = peak_of(lambda: codec.decode(parsed, expected))
        out[name] = {"payload": len(data), "peak": peak, "refused": refused}
    x = torch.randn(8 * 1024 * 1024)  # a real 32 MiB update
    for codec in (Int8(), Int8("channel"), Float16()):
        data = codec.encode({"w": x.reshape(4096, 2048)}).to_bytes()
        parsed = Payload.from_bytes(data)
        peak, refused = peak_of(lambda: codec.decode(parsed, {"w": x.reshape(4096, 2048)}))
        out[f"real-{codec!r}"] = {"payload": len(data), "update": x.numel() * 4, "peak": peak,
                                  "refused": refused}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, object]]:
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "bomb",
    [
        "topk-unknown-key",
        "topk-oversized",
        "int8-unknown-key",
        "int8-oversized",
        "float16-unknown-key",
        "float16-oversized",
    ],
)
def test_a_bomb_is_refused_before_allocating_more_than_64_mib(
    measured: dict[str, dict[str, object]], bomb: str
) -> None:
    got = measured[bomb]
    assert got["refused"] is not None, f"{bomb} decoded"
    why = str(got["refused"])
    assert any(m in why for m in ("not one the receiver has", "claims shape", "lacks tensors"))
    assert int(got["peak"]) <= 64 * MiB, f"{bomb}: {int(got['peak']) / MiB:.1f} MiB"  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "codec",
    [
        "Int8(granularity='tensor', stochastic=False, seed=0)",
        "Int8(granularity='channel', stochastic=False, seed=0)",
        "Float16()",
    ],
)
def test_a_real_update_decodes_within_twice_the_larger_of_payload_and_update(
    measured: dict[str, dict[str, object]], codec: str
) -> None:
    got = measured[f"real-{codec}"]
    assert got["refused"] is None
    bound = 2 * max(int(got["payload"]), int(got["update"]))  # type: ignore[call-overload]
    assert int(got["peak"]) <= bound, f"{codec}: {int(got['peak']) / MiB:.1f} MiB"  # type: ignore[call-overload]
