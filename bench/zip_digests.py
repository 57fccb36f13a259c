"""SHA-256 of the zipped file of every bundled pair, for refactors that must not change results.

    python bench/zip_digests.py > before.txt     # on the old code
    python bench/zip_digests.py | diff before.txt -   # on the new code: no output when nothing changed
    python bench/zip_digests.py --canonical           # node order left out: for changes of order alone

Per pair of samples/digits/manifest.json (and the embedding pairs): zipit at alpha 0.5, beta 1,
permute and average, all but the heads shared, plus zipit at a partial depth and zipit with the
correction off, saved through `onnxzip.zip_models` (so normalization, parsing, statistics,
matching, rewrite, correction, validation and saving all take part). Also the label-free default
on two pairs. Deterministic: exact statistics, fixed hash seed not needed (outputs are byte-identical
across runs, tests/test_faults.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip import zip_models  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"
CONFIGS = [
    ("zipit", {"alpha": 0.5, "beta": 1.0}, None, True),
    ("permute", {}, None, True),
    ("average", {}, None, True),
    ("zipit", {"alpha": 0.5, "beta": 1.0}, 1, True),
    ("zipit", {"alpha": 0.3, "beta": 0.125}, None, False),
]


def digest(path: Path, canonical: bool = False) -> str:
    """The file's hash, or with ``canonical`` the hash of its content in an order-free form: nodes and
    initializers sorted by their serialized bytes (a change of node order alone changes nothing)."""
    if not canonical:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    model = onnx.load(str(path))
    h = hashlib.sha256()
    g = model.graph
    for part in (sorted(n.SerializeToString() for n in g.node), sorted(t.SerializeToString() for t in g.initializer),
                 [v.SerializeToString() for v in list(g.input) + list(g.output)],
                 sorted(p.SerializeToString() for p in model.metadata_props)):
        for item in part:
            h.update(item)
    return h.hexdigest()[:16]


def main() -> None:
    canonical = "--canonical" in sys.argv[1:]
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    pairs = {name: (SAMPLES / e["a"], SAMPLES / e["b"], {}, SAMPLES / e["calib"]) for name, e in manifest.items()}
    classes = {t: SAMPLES / f"classes_{t}.npy" for t in "ab"}
    pairs.update({f"{arch}-emb": (SAMPLES / f"{arch}_emb_a.onnx", SAMPLES / f"{arch}_emb_b.onnx", classes,
                                  SAMPLES / "calib.npz") for arch in ("mlp", "vgg")})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "z.onnx"
        for name, (a, b, cls, calib) in pairs.items():
            runs = [(m, p, d, r) for m, p, d, r in CONFIGS] + ([("zipit", {}, None, True)] if name in ("vgg", "mlp") else [])
            if cls:
                runs = [(m, p, "all", r) for m, p, d, r in CONFIGS[:3]]
            for method, params, depth, repair in runs:
                zip_models(a, b, calib, output=out, method=method, params=params, stop_at=depth,
                           tasks=["a", "b"], do_repair=repair, classes=cls or None, refit=False)
                label = f"{method} {json.dumps(params, sort_keys=True)} stop_at={depth} repair={repair}"
                print(f"{name} | {label} | {digest(out, canonical)}", flush=True)


if __name__ == "__main__":
    main()
