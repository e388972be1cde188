"""jstate vs plain Orbax on object storage emulators: save and restore of 256 MiB (16 arrays) and of
1,000 small arrays, on fake-gcs-server (gs://) and moto (s3://), both on 127.0.0.1.

Both sides write the same arrays to the same emulator in one run, interleaved in rotating order:
jstate's `Saver` (an Orbax checkpoint plus its manifest, checksums and listing) against Orbax's
`StandardCheckpointer` (save + wait, restore onto the same shardings). Plain Orbax cannot write
s3:// by itself (see README): it runs with jstate's shim installed, which only chooses
tensorstore's s3 driver, and commits with a commit file (as on gs://, where that is its default). The emulators keep everything in memory on this machine: the ratios show
jstate's overhead over Orbax, not what a real bucket across a network costs.

    python benchmarks/bench_cloud.py            # ~3-5 min on 2 cores
    python benchmarks/bench_cloud.py --quick    # tiny sizes, < 1 min: a smoke test
"""

from __future__ import annotations

import os
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "cloud"))

import _harness  # noqa: E402
import emulators as cloud  # noqa: E402  (the tests' emulator harness)


def measure(run: str, tree: dict, abstract: dict, rounds: int) -> tuple[dict, dict]:
    """Seconds per save and per restore of `tree` under URL `run`: jstate's and Orbax's, interleaved."""
    import jax
    import orbax.checkpoint as ocp

    import jstate

    state = jstate.State.from_tree(tree, flat=True)
    # Orbax's own rename-based commit fails on S3 (rename is copy + delete): a commit file, as jstate uses.
    commit_file = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
    saver, checkpointer = jstate.Saver(), ocp.StandardCheckpointer(atomicity_options=commit_file)
    counter = iter(range(10**6))
    paths: dict[str, str] = {}

    def jstate_save():
        paths["jstate"] = saver.save(state, f"{run}/jstate-{next(counter)}")

    def orbax_save():
        paths["orbax"] = f"{run}/orbax-{next(counter)}"
        checkpointer.save(paths["orbax"], tree)
        checkpointer.wait_until_finished()

    def jstate_restore():
        jax.block_until_ready(saver.restore(paths["jstate"], abstract))

    def orbax_restore():
        jax.block_until_ready(checkpointer.restore(paths["orbax"], abstract))

    saves = _harness.interleave({"jstate": jstate_save, "orbax": orbax_save}, rounds)
    restores = _harness.interleave({"jstate": jstate_restore, "orbax": orbax_restore}, rounds)
    checkpointer.close()
    return saves, restores


def main() -> None:
    args = _harness.parse_args(__doc__.splitlines()[0])
    _harness.use_cpu_devices(8)
    rounds = 1 if args.quick else 3
    big = (16, 64 * 1024) if args.quick else (16, 4 * 1024 * 1024)  # 16 float32 arrays: 4 MiB / 256 MiB
    small = (100 if args.quick else 1000, 256)
    with cloud.fake_gcs_server() as gcs, cloud.moto_s3_server() as s3:
        for name in cloud.UNSET:
            os.environ.pop(name, None)
        os.environ.update(cloud.loopback_env(gcs, s3))  # before any client is made
        import jax
        import numpy as np

        from jstate.formats import orbax_s3

        orbax_s3.apply()  # plain Orbax on s3:// needs it too
        _harness.print_header("jstate vs Orbax on object-storage emulators", args.quick, jax)
        print(f"emulators: fake-gcs-server ({gcs.endpoint}), moto ({s3.endpoint}); in memory, loopback only")
        rows = []
        for count, size in (big, small):
            rng = np.random.default_rng(0)
            tree = {f"v{i:04d}": jax.numpy.asarray(rng.standard_normal(size, dtype=np.float32)) for i in range(count)}
            nbytes = sum(a.nbytes for a in tree.values())
            case = f"{count} arrays, {nbytes / 2**20:.3g} MiB"
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
            for emulator in (gcs, s3):
                saves, restores = measure(emulator.url(f"bench-{uuid.uuid4().hex[:6]}"), tree, abstract, rounds)
                for what, times in (("save", saves), ("restore", restores)):
                    ratio = _harness.median_ratio(times["jstate"], times["orbax"])
                    rows.append((emulator.scheme, case, what, _harness.median(times["jstate"]),
                                 _harness.median(times["orbax"]), ratio, nbytes))  # fmt: skip
        print(f"\n{'store':5} {'case':22} {'op':8} {'jstate s':>9} {'orbax s':>9} {'ratio':>6} {'jstate MiB/s':>12}")
        for scheme, case, what, mine, theirs, ratio, nbytes in rows:
            print(
                f"{scheme + '://':5} {case:22} {what:8} {mine:9.3f} {theirs:9.3f} {ratio:6.2f} {nbytes / mine / 2**20:12.1f}"
            )
        print("\nratio = median of per-round jstate/orbax times, measured side by side; emulators, not real buckets.")


if __name__ == "__main__":
    main()
