"""Write the TensorFlow checkpoints that tests/test_tensorflow.py reads, with real TensorFlow.

TensorFlow is never a jstate dependency: run this once, in a throwaway virtual environment, and
commit what it writes. The committed fixtures were written by TensorFlow 2.21.0 (tensorflow-cpu,
numpy 2.4.6, Python 3.11) with:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python tests/data/tensorflow/make_fixtures.py

It replaces everything under tests/data/tensorflow/ but this script. Checkpoints:

  guide/model.ckpt        TF1 guide: v1, v2, weights, biases; tf.compat.v1.train.Saver, graph mode
  guide/my_v2.ckpt        the same graph saved with Saver({"my_v2": v2})
  train/model.ckpt-{10,20}  a 2-layer model trained with Adam (slot variables, global_step),
                          saved at two steps, so the `checkpoint` state file names model.ckpt-20
  encoder/model.ckpt-5    24 dense blocks (encoder/block_{0..23}/dense/{kernel,bias}) and a head
                          trained with Adam: 153 entries, 146 of them optimizer state (plans in 120 columns)
  dtypes/model.ckpt       one variable per dtype jstate reads (complex too), scalars, an empty tensor
  sharded/model.ckpt      Saver(sharded=True) over variables on 3 CPU devices: 3 data files
  skipped/model.ckpt      what jstate cannot read: a string and a partitioned variable
  tf2/ckpt-1              tf.train.Checkpoint of a tf.Module (object-graph names), with state file

Every tensor's value, as TensorFlow's own reader returns it, is stored as .npy under
values/<checkpoint>/ and listed in values/index.json:

    {"<checkpoint>": {"<tensor name>": {"dtype": "bfloat16", "shape": [2, 3],
                                         "file": "values/<checkpoint>/003.npy" or null,
                                         "partitioned": false}}}

`file` is null for strings; dtypes numpy lacks (bfloat16) are stored as their raw bits (uint16).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = Path(__file__).resolve().parent
RNG = np.random.default_rng(7)
NO_STATE = {"write_state": False, "write_meta_graph": False}  # the .meta graphs are large; guide/model.ckpt keeps one


def session(cpus: int = 1) -> tf.compat.v1.Session:
    config = tf.compat.v1.ConfigProto(device_count={"CPU": cpus})
    return tf.compat.v1.Session(config=config)


def guide() -> list[str]:
    """The TF1 programmer's guide example (shapes shrunk to keep the fixtures small)."""
    with tf.Graph().as_default():
        v1 = tf.compat.v1.get_variable("v1", shape=[3], initializer=tf.compat.v1.zeros_initializer)
        v2 = tf.compat.v1.get_variable("v2", shape=[5], initializer=tf.compat.v1.zeros_initializer)
        inc_v1 = v1.assign(v1 + 1)
        dec_v2 = v2.assign(v2 - 1)
        weights = tf.Variable(tf.random.normal([100, 20], stddev=0.35, seed=1), name="weights")
        biases = tf.Variable(tf.zeros([20]), name="biases")
        with session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run([inc_v1, dec_v2])
            tf.compat.v1.train.Saver().save(sess, str(HERE / "guide/model.ckpt"), write_state=False)  # with .meta
            tf.compat.v1.train.Saver({"my_v2": v2}).save(sess, str(HERE / "guide/my_v2.ckpt"), **NO_STATE)
        del weights, biases
    return ["guide/model.ckpt", "guide/my_v2.ckpt"]


def train() -> list[str]:
    """Two dense layers fitted with Adam; saved at steps 10 and 20 with a `checkpoint` file."""
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(3)
        x = tf.constant(RNG.normal(size=(16, 4)).astype(np.float32))
        y = tf.constant(RNG.normal(size=(16, 2)).astype(np.float32))
        hidden = x
        for name, (n_in, n_out) in [("layer1", (4, 8)), ("layer2", (8, 2))]:
            with tf.compat.v1.variable_scope(name):
                w = tf.compat.v1.get_variable("weights", [n_in, n_out])
                b = tf.compat.v1.get_variable("biases", [n_out], initializer=tf.compat.v1.zeros_initializer)
            hidden = tf.matmul(hidden, w) + b
            if name == "layer1":
                hidden = tf.nn.relu(hidden)
        loss = tf.reduce_mean((hidden - y) ** 2)
        step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=step)
        # Relative paths in the state file, so the fixtures can move (TF's default is the path
        # as given to `save`, often absolute).
        saver = tf.compat.v1.train.Saver(max_to_keep=5, save_relative_paths=True)
        with session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for i in range(1, 21):
                sess.run(train_op)
                if i % 10 == 0:
                    saver.save(sess, str(HERE / "train/model.ckpt"), global_step=step, write_meta_graph=False)
    return ["train/model.ckpt-10", "train/model.ckpt-20"]


def encoder(layers: int = 24) -> list[str]:
    """A deep TF1 model fitted with Adam for 5 steps: per-layer variables to stack, and over a
    hundred slots and powers that a restore of the model leaves unused."""
    rng = np.random.default_rng(24)  # its own: the fixtures before it keep their values
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(24)
        x = tf.constant(rng.normal(size=(16, 4)).astype(np.float32))
        hidden = x
        for i in range(layers):
            with tf.compat.v1.variable_scope(f"encoder/block_{i}/dense"):
                w = tf.compat.v1.get_variable(
                    "kernel", [4, 4], initializer=tf.compat.v1.random_normal_initializer(0, 0.3)
                )
                b = tf.compat.v1.get_variable("bias", [4], initializer=tf.compat.v1.zeros_initializer)
            hidden = tf.nn.tanh(tf.matmul(hidden, w) + b)
        with tf.compat.v1.variable_scope("head"):
            w = tf.compat.v1.get_variable("kernel", [4, 1])
            b = tf.compat.v1.get_variable("bias", [1], initializer=tf.compat.v1.zeros_initializer)
        loss = tf.reduce_mean((tf.matmul(hidden, w) + b - tf.sin(x[:, :1])) ** 2)
        step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=step)
        with session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for _ in range(5):
                sess.run(train_op)
            tf.compat.v1.train.Saver().save(sess, str(HERE / "encoder/model.ckpt"), global_step=step, **NO_STATE)
    return ["encoder/model.ckpt-5"]


def dtypes() -> list[str]:
    """One variable of every dtype a TF variable can hold and jstate reads, plus a scalar."""
    values = {
        "float16": RNG.normal(size=(3, 4)).astype(np.float16),
        "float32": RNG.normal(size=(2, 3, 4)).astype(np.float32),
        "float64": RNG.normal(size=(5,)),
        "bfloat16": RNG.normal(size=(2, 8)).astype(tf.bfloat16.as_numpy_dtype),
        "int8": RNG.integers(-128, 128, size=(7,), dtype=np.int8),
        "int16": RNG.integers(-(2**15), 2**15, size=(7,), dtype=np.int16),
        "int32": RNG.integers(-(2**31), 2**31, size=(2, 7), dtype=np.int32),
        "int64": RNG.integers(-(2**63), 2**63 - 1, size=(7,), dtype=np.int64),
        "uint8": RNG.integers(0, 2**8, size=(7,), dtype=np.uint8),
        "uint16": RNG.integers(0, 2**16, size=(7,), dtype=np.uint16),
        "uint32": RNG.integers(0, 2**32, size=(7,), dtype=np.uint32),
        "uint64": RNG.integers(0, 2**64 - 1, size=(7,), dtype=np.uint64),
        "bool": RNG.integers(0, 2, size=(3, 3)).astype(bool),
        "complex64": (RNG.normal(size=(4,)) + 1j * RNG.normal(size=(4,))).astype(np.complex64),
        "complex128": RNG.normal(size=(2,)) + 1j * RNG.normal(size=(2,)),
        "scalar": np.float32(2.5),
        "scalar_int": np.int64(-42),
        "empty": np.zeros((0, 3), np.float32),
    }
    with tf.Graph().as_default():
        for name, value in values.items():
            tf.Variable(value, name=name)
        with session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(HERE / "dtypes/model.ckpt"), **NO_STATE)
    return ["dtypes/model.ckpt"]


def sharded() -> list[str]:
    """Saver(sharded=True) writes one data file per device holding variables."""
    with tf.Graph().as_default():
        for device in range(3):
            with tf.device(f"/cpu:{device}"):
                tf.Variable(RNG.normal(size=(4 + device, 3)).astype(np.float32), name=f"cpu{device}/kernel")
                tf.Variable(RNG.integers(0, 100, size=(device + 1,)).astype(np.int32), name=f"cpu{device}/count")
        with session(cpus=3) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver(sharded=True).save(sess, str(HERE / "sharded/model.ckpt"), **NO_STATE)
    return ["sharded/model.ckpt"]


PARTITIONED = {"skipped/model.ckpt": {"embedding"}}  # TF's reader hides which variables are sliced


def skipped() -> list[str]:
    """What jstate cannot read (a string, a partitioned variable) next to a plain variable."""
    with tf.Graph().as_default():
        tf.Variable(RNG.normal(size=(3,)).astype(np.float32), name="plain")
        tf.Variable(["hello", "world"], name="words")
        tf.compat.v1.get_variable(
            "embedding",
            shape=[6, 2],
            initializer=tf.compat.v1.random_normal_initializer(seed=1),
            partitioner=tf.compat.v1.fixed_size_partitioner(2),
        )
        with session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(HERE / "skipped/model.ckpt"), **NO_STATE)
    return ["skipped/model.ckpt"]


class Dense(tf.Module):
    def __init__(self, n_in: int, n_out: int, name: str):
        super().__init__(name=name)
        self.kernel = tf.Variable(RNG.normal(size=(n_in, n_out)).astype(np.float32), name="kernel")
        self.bias = tf.Variable(np.zeros(n_out, np.float32), name="bias")


class Model(tf.Module):
    def __init__(self):
        super().__init__(name="model")
        self.layers = [Dense(4, 8, "dense0"), Dense(8, 2, "dense1")]
        self.scale = tf.Variable(np.float64(0.5), name="scale")


def tf2() -> list[str]:
    """TF2's object-based checkpoint of a tf.Module, through a CheckpointManager."""
    ckpt = tf.train.Checkpoint(model=Model(), step=tf.Variable(7, dtype=tf.int64))
    tf.train.CheckpointManager(ckpt, str(HERE / "tf2"), max_to_keep=1).save()
    return ["tf2/ckpt-1"]


def record(prefixes: list[str]) -> dict:
    """Each tensor of each checkpoint, as TensorFlow reads it, to .npy files plus an index."""
    index: dict = {}
    for prefix in prefixes:
        reader = tf.train.load_checkpoint(str(HERE / prefix))
        dtypes = reader.get_variable_to_dtype_map()
        shapes = reader.get_variable_to_shape_map()
        partitioned = PARTITIONED.get(prefix, set())
        out = HERE / "values" / prefix
        out.mkdir(parents=True, exist_ok=True)
        entries = {}
        for i, name in enumerate(sorted(dtypes)):
            dtype = dtypes[name]
            file = None
            if dtype != tf.string:
                value = np.asarray(reader.get_tensor(name))
                if dtype == tf.bfloat16:
                    value = value.view(np.uint16)
                file = f"values/{prefix}/{i:03d}.npy"
                np.save(HERE / file, value, allow_pickle=False)
            entries[name] = {
                "dtype": dtype.name,
                "shape": list(shapes[name]),
                "file": file,
                "partitioned": name in partitioned,
            }
        index[prefix] = entries
    return index


def main() -> None:
    for entry in HERE.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
    for name in ("guide", "train", "encoder", "dtypes", "sharded", "skipped", "tf2"):
        (HERE / name).mkdir()  # the sharded Saver does not create it
    prefixes = guide() + train() + dtypes() + sharded() + skipped() + tf2() + encoder()
    index = record(prefixes)
    (HERE / "values/index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"TensorFlow {tf.__version__}: wrote {len(prefixes)} checkpoints, {total / 1024:.0f} KiB under {HERE}")


if __name__ == "__main__":
    main()
