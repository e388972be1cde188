"""Orbax on ``s3://``: the one place jstate changes Orbax's behaviour.

What is patched: three functions of orbax-checkpoint 0.12.8 that decide where tensorstore writes
and reads arrays, `tensorstore_utils._normalize_path`, `tensorstore_utils._use_gcs_driver` and
`gcs_utils.get_kvstore_for_gcs`. Orbax treats only ``gs://`` as remote: given ``s3://``,
`_normalize_path` makes it ``s3:/...`` (`os.path.normpath`), `_use_gcs_driver` says no, and
tensorstore gets a `file` kvstore. With OCDBT the save then fails late ("Checkpoint path should
be absolute"); without it the arrays go to a local directory named ``s3:`` while the metadata
goes to S3. Each wrapper gives an ``s3://`` path tensorstore's own `s3` driver (`s3_kvstore`)
and hands every other path to the original, unchanged.

For whom: processes that read or write an ``s3://`` checkpoint through jstate. Nothing else
in the process sees a difference (every path that is not ``s3://`` takes Orbax's own code), and
a process that never touches ``s3://`` is never patched.

When: `apply` runs once per process, on the first ``s3://`` checkpoint (`orbax.check_store`,
before a save writes anything, and before every Orbax read). Orbax reads these functions as
module attributes while its background threads write, so the patch cannot be confined to one
call: it stays for the rest of the process. Each function is checked to exist, and Orbax is
checked to build its kvstores through them, before jstate lets it near S3: an Orbax whose
internals moved gets a clear error instead of a silent local write. tests/cloud/test_cloud_checkpoints.py
checks the patch against the Orbax installed.

Orbax's own rename-based commit cannot work on S3 either: `orbax.Writer` commits with a commit
file there, as Orbax chooses for ``gs://`` by itself.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..storage import store as _storage

TESTED = "0.12.8"  # the orbax-checkpoint whose internals `apply` patches


def adapt(directory: Path) -> None:
    """Make Orbax able to read and write `directory` (`apply` where it is on ``s3://``).

    Raises:
      CheckpointError: `directory` is on ``s3://`` and the installed Orbax is not one `apply` can adapt.
    """
    if _storage.store_for(directory).scheme == "s3":
        apply()


@functools.cache
def apply() -> None:
    """Patch Orbax's three kvstore functions (see the module docstring), once per process.

    Raises:
      CheckpointError: the installed Orbax lacks one of them, or no longer builds its kvstores
        through them.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    targets = (
        (tensorstore_utils, "_normalize_path"),
        (tensorstore_utils, "_use_gcs_driver"),
        (gcs_utils, "get_kvstore_for_gcs"),
    )
    missing = [f"{m.__name__}.{name}" for m, name in targets if not callable(getattr(m, name, None))]
    if missing:
        raise CheckpointError(
            f"s3:// checkpoints need orbax-checkpoint {TESTED} (jstate adapts its S3 paths), "
            f"but the installed {ocp.__version__} lacks {', '.join(missing)}. Install "
            f"`orbax-checkpoint=={TESTED}`, or use gs:// or a local path. Nothing was written."
        )
    normalize, use_gcs, kvstore = (getattr(m, name) for m, name in targets)

    def _normalize_path(path: str) -> str:
        return "s3://" + os.path.normpath(path[len("s3://") :]) if str(path).startswith("s3://") else normalize(path)

    def _use_gcs_driver(directory: str) -> bool:
        return str(directory).startswith("s3://") or use_gcs(directory)

    def get_kvstore_for_gcs(path: str) -> dict[str, Any]:
        return s3_kvstore(path) if str(path).startswith("s3://") else kvstore(path)

    tensorstore_utils._normalize_path = _normalize_path
    tensorstore_utils._use_gcs_driver = _use_gcs_driver
    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs
    # Proof that Orbax builds its kvstores through these functions still: else a local write.
    try:
        specs = [tensorstore_utils.build_kvstore_tspec("s3://bucket/x", use_ocdbt=o) for o in (False, True)]
        took = "file" not in json.dumps(specs) and '"s3"' in json.dumps(specs)
    except Exception:  # an Orbax whose internals moved: it cannot be trusted with s3:// either
        took = False
    if not took:
        raise CheckpointError(
            f"s3:// checkpoints need orbax-checkpoint {TESTED}: the installed {ocp.__version__} "
            "builds its tensorstore paths elsewhere, so jstate cannot point it at S3 (it would write a local "
            f"directory named 's3:'). Install `orbax-checkpoint=={TESTED}`, or use gs:// or a local "
            "path. Nothing was written."
        )


def s3_kvstore(path: str) -> dict[str, Any]:
    """tensorstore's kvstore spec for ``s3://bucket/key``: endpoint and region from the
    environment as boto3 reads them (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
    ``AWS_REGION``, ``AWS_DEFAULT_REGION``), since tensorstore's s3 driver ignores
    ``AWS_ENDPOINT_URL``; without an endpoint, tensorstore's default (AWS). Credentials: from
    ``AWS_ACCESS_KEY_ID`` and its siblings where set, else AWS's default chain.

    Args:
      path: an ``s3://bucket/key`` URL.

    Returns:
      The spec, a JSON-able dict.

    >>> s3_kvstore("s3://bucket/ckpt/a")["path"]
    'ckpt/a'
    """
    bucket, _, key = str(path)[len("s3://") :].partition("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # straight to them: the default chain logs each provider it tries
        spec["aws_credentials"] = {"type": "environment"}
    return spec
