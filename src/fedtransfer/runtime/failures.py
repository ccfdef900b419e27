"""How a worker's failure reaches the caller: the errors a map raises and the text they carry.

A worker process or actor that dies raises :class:`WorkerLost` (built by :func:`_lost_error`
from what a channel reports, :class:`_Lost`, naming the tasks it held); a worker that cannot
read its message raises :class:`Fatal`; an exception raised by a task travels back pickled
(:func:`_exception`), with its worker-side traceback as a :class:`RemoteTraceback` cause.
Shared by the caller's side (:mod:`.transport`) and the worker's (:mod:`.worker`).
"""

from __future__ import annotations

import pickle
import traceback

from fedtransfer.runtime.pickling import PROTOCOL


class WorkerLost(RuntimeError):
    """A worker process or actor died while tasks were in flight; the runtime stops its workers
    and starts new ones on the next map."""


class _Lost(Exception):
    """Raised by a channel: ``worker`` is gone, ``why`` says how (``detail``: more of it)."""

    def __init__(self, worker: int, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.worker = worker
        self.why = why
        self.detail = detail


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as the re-raised exception's cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class Fatal(Exception):
    """A worker could not read its message; its state is unknown, so the workers must go."""


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _exception(exc: BaseException) -> tuple[bytes, str]:
    """``exc`` pickled (or, if it does not survive pickling, a RuntimeError with its text) and
    its formatted traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)
    except Exception:
        blob = pickle.dumps(RuntimeError(_describe(exc)), protocol=PROTOCOL)
    return blob, tb


def _lost_error(
    lost: _Lost, inflight: dict[int, tuple[int, range]], extra: range = range(0)
) -> WorkerLost:
    held = sorted(
        {i for w, chunk in inflight.values() if w == lost.worker for i in chunk} | set(extra)
    )
    shown = ", ".join(map(str, held[:10])) + (f" … ({len(held)} in all)" if len(held) > 10 else "")
    doing = f" while it held the tasks at indices {shown} of this map" if held else ""
    detail = f"\n{lost.detail}" if lost.detail else ""
    return WorkerLost(
        f"{lost.why}{doing}. The runtime's workers were stopped; the next map starts new "
        f"ones.{detail}"
    )
