"""Registry of op handlers, keyed by ONNX op type.

A handler is ``handler(ctx, node) -> list[Space]``: given the spaces of the node's inputs
(through ``ctx``), it returns one space per output, and records weight layers and per-channel
parameters on ``ctx``. A handler that cannot pass the features through calls
``ctx.unsupported(...)``.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["register", "get_handler", "supported_ops"]

_HANDLERS: dict[str, Callable] = {}


def register(*op_types: str):
    def deco(fn):
        for op in op_types:
            _HANDLERS[op] = fn
        return fn

    return deco


def get_handler(op_type: str) -> Callable | None:
    return _HANDLERS.get(op_type)


def supported_ops() -> list[str]:
    return sorted(_HANDLERS)
