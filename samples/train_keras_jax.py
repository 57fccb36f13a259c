"""Keras (tf2onnx) and JAX/Flax (jax2onnx) partners for the torch digits samples: cross-framework pairs.

Optional extra: onnxzip, its tests and the torch samples never need TensorFlow or JAX. Each framework
runs in its own virtual environment (their numpy/protobuf pins clash with each other and with torch):

    # Python 3.11; samples/requirements-keras.txt pins:
    #   tensorflow-cpu==2.21.0  tf2onnx==1.17.0  keras==3.15.1  onnxruntime==1.32.0
    python3.11 -m venv /tmp/tfenv  && /tmp/tfenv/bin/pip install -r samples/requirements-keras.txt
    # Python 3.11; samples/requirements-jax.txt pins:
    #   jax==0.10.2  jaxlib==0.10.2  flax==0.12.8  optax==0.2.8  jax2onnx==0.17.1  onnxruntime==1.32.0
    python3.11 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install -r samples/requirements-jax.txt

    /tmp/tfenv/bin/python  samples/train_keras_jax.py keras   # keras_{mlp,vgg}_a*.onnx  (about 1 minute)
    /tmp/jaxenv/bin/python samples/train_keras_jax.py jax     # jax_{mlp,vgg}_b.onnx     (about 2 minutes)

Same data as the torch samples (samples/digits/train_{a,b}.npz, test_{a,b}.npz, written by
samples/train_digits.py; this script never rewrites them), same architectures as the torch ``mlp``
and ``vgg`` samples, same recipe (AdamW, one-cycle learning rate, batch 64, random shifts of up to 2
pixels, the torch recipe's epochs, learning rate and weight decay), each from its own random init:

- Keras models are trained on task ``a`` (digits 0-4) so they zip with the torch ``*_b.onnx``;
- JAX models are trained on task ``b`` (digits 5-9) so they zip with the torch ``*_a.onnx``
  (and ``keras_*_a.onnx`` + ``jax_*_b.onnx`` is a pair with no torch model at all).

Both frameworks compute in NHWC. Exports (input ``input``, output ``logits``, dynamic batch):

- ``keras_<arch>_a.onnx``: ``tf2onnx.convert.from_function(..., inputs_as_nchw=["input"])``, opset 15
  (tf2onnx's default): input [N, 1, 16, 16] NCHW like the torch models;
- ``keras_mlp_a.nhwc.onnx``: the same mlp weights without ``inputs_as_nchw``: input [N, 16, 16, 1];
- ``jax_<arch>_b.onnx``: ``jax2onnx.to_onnx(model, [("B", 16, 16, 1)], inputs_as_nchw=[0])``, opset 23
  (jax2onnx's default): input [N, 1, 16, 16].

Every file is checked with onnx.checker and run in onnxruntime on both test sets (full batch and
batch 1) against the framework's own outputs. Per-model facts go to ``digits/info_keras_jax.json``;
the pairs are added to ``digits/manifest.json`` (other entries are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZE = 16
NUM_CLASSES = 5
BATCH = 64
MAX_SHIFT = 2
# The torch recipes (samples/train_digits.py): epochs, peak learning rate, weight decay.
RECIPES = {"mlp": dict(epochs=40, lr=1e-3, wd=1e-4), "vgg": dict(epochs=30, lr=1e-3, wd=5e-4)}
# Seeds: Keras models (task a) 5000 + arch offset, JAX models (task b) 6001 + arch offset.
SEEDS = {("keras", "mlp"): 5000, ("keras", "vgg"): 5100, ("jax", "mlp"): 6001, ("jax", "vgg"): 6101}
TASK = {"keras": "a", "jax": "b"}
ARCHS = ["mlp", "vgg"]
NHWC_ARCHS = ["mlp"]  # also exported without inputs_as_nchw (input [N, 16, 16, 1])
VERSIONS = {
    "keras": {"python": "3.11", "tensorflow-cpu": "2.21.0", "tf2onnx": "1.17.0", "keras": "3.15.1"},
    "jax": {"python": "3.11", "jax": "0.10.2", "flax": "0.12.8", "jax2onnx": "0.17.1", "optax": "0.2.8"},
}


# --------------------------------------------------------------------------------------------
# Framework-free parts: data, augmentation, schedule, verification, bookkeeping
# --------------------------------------------------------------------------------------------
def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["input"].astype(np.float32), z["labels"].astype(np.int64)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def shift_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random translation of NHWC images by up to MAX_SHIFT pixels (zero fill), as the torch recipe."""
    n = x.shape[0]
    pad = np.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
    offs = rng.integers(0, 2 * MAX_SHIFT + 1, size=(n, 2))
    out = np.empty_like(x)
    for i in range(n):
        dy, dx = offs[i]
        out[i] = pad[i, dy:dy + SIZE, dx:dx + SIZE]
    return out


def one_cycle(total_steps: int, peak: float, pct_start: float = 0.15, div: float = 25.0,
              final_div: float = 1e4) -> np.ndarray:
    """torch's OneCycleLR (cosine annealing) learning rate for every step, as a table."""
    start, end = peak / div, peak / div / final_div
    up = max(1, int(pct_start * total_steps) - 1)
    lr = np.empty(total_steps, np.float64)
    for s in range(total_steps):
        if s <= up:
            t, lo, hi = s / up, start, peak
        else:
            t, lo, hi = (s - up) / max(1, total_steps - 1 - up), peak, end
        lr[s] = hi + (lo - hi) * (1 + np.cos(np.pi * t)) / 2
    return lr.astype(np.float32)


def batches(n: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for k in range(0, n, BATCH):
        b = perm[k:k + BATCH]
        if len(b) >= 2:  # BatchNorm needs more than one sample
            yield b


def steps_per_epoch(n: int) -> int:
    return sum(1 for k in range(0, n, BATCH) if len(range(k, min(k + BATCH, n))) >= 2)


def verify(path: Path, reference, x_eval_nchw: np.ndarray, nhwc_input: bool) -> dict:
    """onnx.checker + onnxruntime vs the framework's own logits (full batch and batch 1)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    try:  # full_check adds shape inference, which fails on jax2onnx's stale value_info (kept as written)
        onnx.checker.check_model(str(path), full_check=True)
        full_check = "ok"
    except Exception as e:  # noqa: BLE001
        full_check = str(e).splitlines()[0][:200] + " ..."
    proto = onnx.load(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["input"] and [o.name for o in outs] == ["logits"], (ins, outs)
    x = to_nhwc(x_eval_nchw) if nhwc_input else x_eval_nchw
    ref = reference(to_nhwc(x_eval_nchw))
    got = sess.run(["logits"], {"input": x})[0]
    diff = float(np.abs(got - ref).max())
    got1 = np.concatenate([sess.run(["logits"], {"input": x[i:i + 1]})[0] for i in range(7)])
    diff1 = float(np.abs(got1 - ref[:7]).max())
    assert diff < 1e-3 and diff1 < 1e-3, (path, diff, diff1)
    assert (got.argmax(1) == ref.argmax(1)).all(), path
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return dict(
        max_abs_diff=diff, max_abs_diff_batch1=diff1, checker_full_check=full_check,
        value_info=len(proto.graph.value_info), opset=opset, ir_version=proto.ir_version,
        opset_domains=sorted({o.domain or "ai.onnx" for o in proto.opset_import}),
        ops=sorted({n.op_type for n in proto.graph.node}), local_functions=len(proto.functions),
        input_shape=str(ins[0].shape), output_shape=str(outs[0].shape), bytes=path.stat().st_size,
    )


def accuracy(predict, x_nchw: np.ndarray, y: np.ndarray) -> float:
    return float((predict(to_nhwc(x_nchw)).argmax(1) == y).mean())


def update_json(path: Path, fn) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    fn(data)
    path.write_text(json.dumps(data, indent=1) + "\n")


def pair_entry(a: str, b: str) -> dict:
    return {"a": a, "b": b, "test_a": "test_a.npz", "test_b": "test_b.npz", "calib": "calib.npz"}


def update_manifest(out: Path, archs: list[str]) -> None:
    def fn(m):
        for arch in archs:
            keras_a, jax_b = f"keras_{arch}_a.onnx", f"jax_{arch}_b.onnx"
            if (out / keras_a).exists():
                m[f"{arch}-keras+torch"] = pair_entry(keras_a, f"{arch}_b.onnx")
            if (out / jax_b).exists():
                m[f"{arch}-torch+jax"] = pair_entry(f"{arch}_a.onnx", jax_b)
            if (out / keras_a).exists() and (out / jax_b).exists():
                m[f"{arch}-keras+jax"] = pair_entry(keras_a, jax_b)
            # keras_mlp_a.nhwc.onnx is no manifest pair: its input is NHWC, calib.npz and test_*.npz are NCHW
    update_json(out / "manifest.json", fn)


# --------------------------------------------------------------------------------------------
# Keras 3 (TensorFlow backend) + tf2onnx
# --------------------------------------------------------------------------------------------
def keras_build(arch: str):
    import keras
    from keras import layers

    inp = keras.Input((SIZE, SIZE, 1), name="input")
    if arch == "mlp":
        x = layers.Flatten()(inp)
        x = layers.Dense(128, activation="relu", name="fc1")(x)
        x = layers.Dense(128, activation="relu", name="fc2")(x)
        out = layers.Dense(NUM_CLASSES, name="fc3")(x)
    else:
        x = inp
        for k, w in enumerate([32, 32, "M", 64, 64, "M", 128]):
            if w == "M":
                x = layers.MaxPooling2D(2)(x)
                continue
            x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{k}")(x)
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{k}")(x)
            x = layers.ReLU()(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(128, activation="relu", name="fc1")(x)
        out = layers.Dense(NUM_CLASSES, name="fc2")(x)
    return keras.Model(inp, out, name=f"keras_{arch}")


def keras_train(arch: str, data, threads: int):
    import keras
    import tensorflow as tf

    seed = SEEDS[("keras", arch)]
    keras.utils.set_random_seed(seed)
    recipe = RECIPES[arch]
    x_train, y_train = data["train_a"]
    x_train = to_nhwc(x_train)
    model = keras_build(arch)
    table = tf.constant(one_cycle(recipe["epochs"] * steps_per_epoch(len(x_train)), recipe["lr"]))

    class Table(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return tf.gather(table, tf.minimum(tf.cast(step, tf.int32), table.shape[0] - 1))

    opt = keras.optimizers.AdamW(learning_rate=Table(), weight_decay=recipe["wd"], beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(recipe["epochs"]):
        for b in batches(len(x_train), rng):
            step(tf.constant(shift_batch(x_train[b], rng)), tf.constant(y_train[b]))
    return model, seed, time.perf_counter() - t0


def keras_export(model, path: Path, nchw: bool) -> None:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, SIZE, SIZE, 1), tf.float32, name="input"),)

    @tf.function(input_signature=spec)
    def serve(x):
        return {"logits": model(x, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, inputs_as_nchw=["input"] if nchw else None)
    # tf2onnx names the outputs after the dict keys; the input keeps the TensorSpec name.
    path.write_bytes(proto.SerializeToString())


def keras_main(args, data) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # reproducible float results
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf
    import tf2onnx

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.experimental.enable_op_determinism()
    out = Path(args.out)
    x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])
    for arch in args.only or ARCHS:
        if args.epochs:
            RECIPES[arch] = dict(RECIPES[arch], epochs=args.epochs)
        model, seed, secs = keras_train(arch, data, args.threads)
        predict = lambda x: model(x, training=False).numpy()  # noqa: E731
        info = dict(
            framework="keras", exporter="tf2onnx", task="a", seed=seed, epochs=RECIPES[arch]["epochs"],
            train_seconds=round(secs, 1), params=int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
            train_acc=accuracy(predict, *data["train_a"]), test_acc=accuracy(predict, *data["test_a"]),
            versions={"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__},
            files={},
        )
        exports = [(True, f"keras_{arch}_a.onnx")]
        if arch in NHWC_ARCHS:
            exports.append((False, f"keras_{arch}_a.nhwc.onnx"))
        for nchw, name in exports:
            keras_export(model, out / name, nchw)
            info["files"][name] = verify(out / name, predict, x_eval, nhwc_input=not nchw)
        print(f"keras {arch}_a: seed {seed} test {info['test_acc']:.4f} train {info['train_acc']:.4f} "
              f"params {info['params']} ({secs:.1f}s)", flush=True)
        update_json(out / "info_keras_jax.json", lambda d: d.__setitem__(f"keras_{arch}_a", info))
        update_manifest(out, [arch])


# --------------------------------------------------------------------------------------------
# JAX + Flax NNX + jax2onnx
# --------------------------------------------------------------------------------------------
def jax_build(arch: str, seed: int):
    from flax import nnx

    rngs = nnx.Rngs(seed)

    class MLP(nnx.Module):
        def __init__(self):
            self.fc1 = nnx.Linear(SIZE * SIZE, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, 128, rngs=rngs)
            self.fc3 = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):  # x: NHWC
            x = x.reshape(x.shape[0], -1)
            x = nnx.relu(self.fc1(x))
            x = nnx.relu(self.fc2(x))
            return self.fc3(x)

    class VGG(nnx.Module):
        def __init__(self):
            cfg, cin = [32, 32, "M", 64, 64, "M", 128], 1
            self.cfg = cfg
            convs, bns = [], []
            for w in cfg:
                if w == "M":
                    continue
                convs.append(nnx.Conv(cin, w, (3, 3), padding="SAME", use_bias=False, rngs=rngs))
                bns.append(nnx.BatchNorm(w, momentum=0.9, epsilon=1e-5, rngs=rngs))
                cin = w
            self.convs, self.bns = nnx.List(convs), nnx.List(bns)
            self.fc1 = nnx.Linear(128, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):  # x: NHWC
            k = 0
            for w in self.cfg:
                if w == "M":
                    x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: jax2onnx patches it
                    continue
                x = nnx.relu(self.bns[k](self.convs[k](x)))
                k += 1
            x = x.mean(axis=(1, 2))
            return self.fc2(nnx.relu(self.fc1(x)))

    return MLP() if arch == "mlp" else VGG()


def jax_train(arch: str, data):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    seed = SEEDS[("jax", arch)]
    recipe = RECIPES[arch]
    x_train, y_train = data["train_b"]
    x_train = to_nhwc(x_train)
    model = jax_build(arch, seed)
    table = jnp.asarray(one_cycle(recipe["epochs"] * steps_per_epoch(len(x_train)), recipe["lr"]))
    schedule = lambda s: table[jnp.minimum(s, table.shape[0] - 1)]  # noqa: E731
    opt = nnx.Optimizer(model, optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=recipe["wd"]), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(recipe["epochs"]):
        for b in batches(len(x_train), rng):
            step(model, opt, jnp.asarray(shift_batch(x_train[b], rng)), jnp.asarray(y_train[b]))
    model.eval()
    del jax
    return model, seed, time.perf_counter() - t0


def jax_main(args, data) -> None:
    from importlib.metadata import version

    import flax
    import jax
    from flax import nnx
    from jax2onnx import to_onnx

    jax.config.update("jax_platforms", "cpu")
    out = Path(args.out)
    x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])
    for arch in args.only or ARCHS:
        if args.epochs:
            RECIPES[arch] = dict(RECIPES[arch], epochs=args.epochs)
        model, seed, secs = jax_train(arch, data)
        fwd = nnx.jit(lambda m, x: m(x))
        predict = lambda x: np.asarray(fwd(model, x))  # noqa: E731
        params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
        info = dict(
            framework="jax", exporter="jax2onnx", task="b", seed=seed, epochs=RECIPES[arch]["epochs"],
            train_seconds=round(secs, 1), params=params,
            train_acc=accuracy(predict, *data["train_b"]), test_acc=accuracy(predict, *data["test_b"]),
            versions={"jax": jax.__version__, "flax": flax.__version__, "jax2onnx": version("jax2onnx"),
                      "optax": version("optax")},
            files={},
        )
        name = f"jax_{arch}_b.onnx"
        proto = to_onnx(model, [("B", SIZE, SIZE, 1)], inputs_as_nchw=[0], input_names=["input"],
                        output_names=["logits"], model_name=f"jax_{arch}")
        (out / name).write_bytes(proto.SerializeToString())
        info["files"][name] = verify(out / name, predict, x_eval, nhwc_input=False)
        print(f"jax {arch}_b: seed {seed} test {info['test_acc']:.4f} train {info['train_acc']:.4f} "
              f"params {params} ({secs:.1f}s)", flush=True)
        update_json(out / "info_keras_jax.json", lambda d: d.__setitem__(f"jax_{arch}_b", info))
        update_manifest(out, [arch])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("framework", choices=["keras", "jax"])
    ap.add_argument("--out", default=str(HERE / "digits"), help="where the npz files are and the models go")
    ap.add_argument("--only", action="append", choices=ARCHS, help="this arch only (repeatable)")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = {f"{s}_{t}": load(out / f"{s}_{t}.npz") for s in ("train", "test") for t in "ab"}
    (keras_main if args.framework == "keras" else jax_main)(args, data)


if __name__ == "__main__":
    main()
