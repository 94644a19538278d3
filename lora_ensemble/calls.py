"""Per-thread state of the :class:`~lora_ensemble.LoRAEnsemble` call in progress.

A call of an ensemble needs a little state while it runs: the batch size its hooks replicate, the input
the first LoRA layer shared, and, with ``member_chunk_size``, which members the chunk runs. None of it
lives on the modules: it is kept per thread (``threading.local``), set by the call and put back as it
was when the call ends, also when it raises. Two threads calling one ensemble (a server's thread pool)
therefore share nothing but the parameters, which no call changes.

* :class:`ThreadLocalSlot`: one value per thread (an ensemble's call state lives in one).
* :data:`MEMBER_SELECTION`: the member slice that the per-member modules (LoRA layers and heads) run
  on this thread, None for all of them. Every ensemble call sets it (None
  when it runs all members), so a call nested in another (an ensemble called inside another's model)
  sees its own.

``torch.compile`` traces the reads and writes of ``threading.local`` attributes and guards on them (a
default must be set per thread by ``__init__``, not as a class attribute, which dynamo would read
statically).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["MEMBER_SELECTION", "ThreadLocalSlot"]


class ThreadLocalSlot(threading.local):
    """One value per thread, ``value``: None on a thread until set there (``__init__`` runs once per
    thread, so the attribute always exists: a read is one attribute lookup, and ``torch.compile`` reads
    and guards the thread's own value). Copies and unpickled copies are fresh slots (the value belongs to
    a call in progress, never to a saved or copied model)."""

    def __init__(self) -> None:
        self.value: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> ThreadLocalSlot:
        return type(self)()

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), ()


# The members the per-member modules (LoRA layers, heads) run on this thread: a slice of their leading
# [N, ...] dim, or None for all of them.
MEMBER_SELECTION = ThreadLocalSlot()
