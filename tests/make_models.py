"""Export the tiny models the tests use into tests/models/ (committed files).

    pip install -e '.[export]'        # torch (CPU build is enough), onnxscript
    python tests/make_models.py       # rewrites every file in tests/models/

The tests read these files through the ``tiny`` fixture (tests/conftest.py), so the plain test
run needs no torch. ``python -m pytest -q -m exporter`` re-exports each model with torch and
checks the committed file still computes the same function (tests/test_tiny_models.py).

Each file is self-contained: the dynamo exporter writes the larger weights to a ``.data`` file
beside the model; they are read back and stored inside the model (the ``tiny`` fixture splits
them out again, as the exporter does, when it hands a dynamo model to a test). The dynamo
exporter's per-node stack traces (``pkg.torch.onnx.stack_trace``, absolute paths of this checkout
and of the torch install) are dropped so the files do not depend on where they were made; the
other node metadata stays, except in the language models, whose node metadata and doc strings are
all dropped (they would be most of the file). Two runs with the same torch give byte-identical files.

To add a model a test needs, add its key to ``MODELS`` and run this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(__file__).resolve().parent / "models"
ARCHS = ["mlp", "cnn", "resnet", "dw", "cat", "vit", "mha", "mixer"]
DEFAULT_OPSET = 17
# onnx_ir (what torch's dynamo exporter saves with) keeps tensors under this many bytes inline
DYNAMO_EXTERNAL_THRESHOLD = 256


class Key(NamedTuple):
    arch: str
    seed: int = 0
    exporter: str = "torchscript"
    fold: bool = True
    opset: int = DEFAULT_OPSET
    batch: int = 0  # 0: a dynamic batch axis; else exported with this static batch

    @property
    def filename(self) -> str:
        name = f"{self.arch}-{self.seed}-{self.exporter}-{int(self.fold)}"
        name += f"-opset{self.opset}" if self.opset != DEFAULT_OPSET else ""
        return name + (f"-batch{self.batch}" if self.batch else "") + ".onnx"


MODELS: list[Key] = sorted({
    # test_invariants: every architecture, both exporters, folded; TorchScript unfolded
    *(Key(a, exporter=e) for a in ARCHS for e in ("torchscript", "dynamo")),
    *(Key(a, fold=False) for a in ARCHS),
    # pairs of different models (test_invariants, test_stats, test_cli)
    Key("cnn", 1), Key("resnet", 1),
    # decomposed LayerNorm and Erf GELU (test_invariants)
    Key("vit", 3, opset=14),
    # language models (test_language_models): BERT (TorchScript; its dynamo export is tested with
    # -m exporter), a LLaMA-style decoder (dynamo: TorchScript cannot export it) and a second seed
    Key("bert", 0), Key("llama", 0, "dynamo"), Key("llama", 1, "dynamo"),
    # grouped-query and multi-query attention (test_language_models)
    Key("llama-gqa", 0, "dynamo"), Key("llama-gqa", 1, "dynamo"), Key("llama-mqa", 0, "dynamo"),
    # partial rotary (test_language_models)
    Key("phi", 0, "dynamo"),
    # a static batch: the dynamo exporter folds the samples into attention's head axis
    # (test_attention_spellings, test_language_models)
    *(Key(a, exporter="dynamo", batch=4) for a in ("mha", "vit", "bert", "llama")),
    # TorchScript (dynamic batch) zipped with dynamo (static batch) exports (test_mixed_exporters)
    Key("cnn", exporter="dynamo", batch=4), Key("resnet", exporter="dynamo", batch=4),
    Key("resnet", 1, "dynamo", batch=4),
})


def path_of(key: Key) -> Path:
    return MODELS_DIR / key.filename


def export(key: Key, folder: Path):
    """Build and export one model with torch into ``folder``; returns the loaded ModelProto
    (external data read back in)."""
    import onnx

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import tiny_models

    path = tiny_models.export(tiny_models.build(key.arch, key.seed), folder / "model.onnx", key.exporter,
                              key.fold, key.opset, key.batch)
    model = onnx.load(str(path))
    lean = key.arch in tiny_models.LANGUAGE_MODELS  # their scopes and docs would be most of the file
    for node in _nodes(model):
        if lean:
            del node.metadata_props[:]
            node.doc_string = ""
            continue
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    return model


def _nodes(model):
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                graphs.extend([a.g] if a.HasField("g") else a.graphs)
    for f in model.functions:
        yield from f.node


def main(argv=None) -> int:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="folder for the .onnx files (default: tests/models)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = {k.filename for k in MODELS}
    stale_files = args.out.glob("*.onnx*") if args.out.resolve() == MODELS_DIR else []
    for stale in sorted(p for p in stale_files if p.name not in wanted):
        stale.unlink()
        print(f"removed {stale.name}")
    total = 0
    for key in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            model = export(key, Path(tmp))
        out = args.out / key.filename
        onnx.save(model, str(out))  # one file: no external data
        onnx.checker.check_model(str(out))
        total += out.stat().st_size
        print(f"{out.name:40s} {out.stat().st_size / 1024:7.1f} KiB")
    print(f"{len(MODELS)} models, {total / 1024:.1f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
