"""onnxruntime execution providers: what the user asked for, what this machine has."""

from __future__ import annotations

from onnxzip.errors import OptionError

__all__ = ["resolve_providers"]

_ALIASES = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "rocm": "ROCMExecutionProvider",
}


def resolve_providers(spec: str | list | None, warn=None) -> list[str]:
    """Provider names from ``"cuda,cpu"``; unavailable ones are dropped with a warning (CPU stays)."""
    import onnxruntime as ort

    if not spec:
        return ["CPUExecutionProvider"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name = _ALIASES.get(item.lower(), item)
        if not name.endswith("ExecutionProvider"):
            raise OptionError(f"unknown execution provider {item!r}: use one of {', '.join(sorted(_ALIASES))} or a full onnxruntime provider name")
        wanted.append(name)
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing and warn is not None:
        warn(f"{', '.join(missing)} not available in this onnxruntime build ({', '.join(sorted(available))}); falling back to CPU")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen
