"""Devices for people: TensorFlow-style device strings parsed into `jax.Device`s, and
shardings described in a few words.

Valid device strings (``device=``, ``sharding=``, ``s.placement(...)`` and rules take them; see
`jstate.model.requests` for everything else a placement may be):

  "/cpu:0", "cpu:0", "cpu"          CPU device 0 (index among that platform's devices)
  "/gpu:1", "/device:GPU:1"         GPU device 1
  "tpu:3"                           TPU device 3
  "/job:ps/task:7"                  the first device of JAX process 7
  "/job:w/task:1/device:GPU:2"      GPU 2 of process 1 (index among that process's GPUs)
"""

from __future__ import annotations

import math
import re

import jax
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding

from ..core.errors import PlacementError

_PLATFORMS = ("cpu", "gpu", "tpu", "cuda", "rocm")


class NoDeviceError(PlacementError):
    """A well-formed device spec that names no device of this machine (soft placement's case)."""


_PART = re.compile(r"^(job|replica|task|device|cpu|gpu|tpu|cuda|rocm)(?::(.*))?$", re.IGNORECASE)


def parse_device(spec: str, name: str = "") -> jax.Device:
    """The `jax.Device` a TensorFlow-style device string names (valid forms: the module docstring).

    Args:
      spec: the device string.
      name: the variable it places, named in errors ("" for none).

    Returns:
      The device (for a platform with no index, its first device).

    Raises:
      PlacementError: `spec` is malformed (naming the part not understood and the valid forms).
      NoDeviceError: `spec` is well formed but names no device of this machine (listing them).

    >>> parse_device("/job:localhost/task:0/device:CPU:3").id
    3
    """
    where = f"Variable '{name}': device" if name else "Device"
    task = platform = index = None
    for part in spec.strip().strip("/").split("/"):
        m = _PART.match(part.strip())
        if not m:
            raise PlacementError(
                f"{where} spec {spec!r} is not understood (at {part!r}). Valid forms: 'cpu:0', "
                "'/gpu:1', '/device:GPU:0', '/job:ps/task:7', 'tpu'."
            )
        key, value = m.group(1).lower(), m.group(2)
        try:
            if key == "task":
                task = int(value)
            elif key == "device":
                platform, _, idx = (value or "").partition(":")
                platform, index = platform.lower(), (int(idx) if idx else None)
            elif key in _PLATFORMS:
                platform, index = key, (int(value) if value else None)
        except ValueError:
            raise PlacementError(f"{where} spec {spec!r}: {part!r} needs a whole number.") from None
    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError:
        devices = []
    if task is not None:
        devices = [d for d in devices if d.process_index == task]
    if index is None and devices:
        return devices[0]
    if index is not None and 0 <= index < len(devices):
        return devices[index]
    raise NoDeviceError(f"{where} spec {spec!r} matches no device. Devices: {list_devices()}.")


def list_devices() -> str:
    """This machine's devices in one line, for errors: "cpu:0 (process 0), ...", the first 16.

    >>> list_devices().startswith("cpu:0 (process 0), cpu:1 (process 0)")
    True
    """
    devices = jax.devices()
    shown = ", ".join(f"{d.platform}:{d.id} (process {d.process_index})" for d in devices[:16])
    return shown + (f" and {len(devices) - 16} more" if len(devices) > 16 else "")


def describe(sharding: Sharding | None) -> str:
    """A sharding in a few words: "default" (None), "cpu:0", or "PartitionSpec('x',) over mesh(x=8)".

    >>> describe(jax.sharding.SingleDeviceSharding(jax.devices()[1]))
    'cpu:1'
    """
    if sharding is None:
        return "default"
    if isinstance(sharding, SingleDeviceSharding):
        (device,) = sharding.device_set
        return f"{device.platform}:{device.id}"
    if isinstance(sharding, NamedSharding):
        axes = ", ".join(f"{k}={v}" for k, v in sharding.mesh.shape.items())
        return f"{sharding.spec} over mesh({axes})"
    return str(sharding)


def device_bytes(nbytes: int, shape: tuple[int, ...], sharding: Sharding | None) -> int:
    """Bytes one device holds of a variable of `shape` taking `nbytes` in all.

    Args:
      nbytes: the whole variable's bytes.
      shape: its shape.
      sharding: its sharding; None (one device) holds all of it.

    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> device_bytes(4096, (1024,), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    512
    """
    if sharding is None or not shape:
        return nbytes
    return nbytes * math.prod(sharding.shard_shape(shape)) // max(math.prod(shape), 1)
