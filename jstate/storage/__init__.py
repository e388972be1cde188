"""Where checkpoints live: one interface (`base.Store`) with two backends, local disks (`local`)
and object stores (``gs://``, ``s3://``: `remote`), picked once per path (`store.store_for`);
the tokens that tell a live writer's files from a dead one's (`tokens`); and how long remote
requests may wait (`deadlines`). It knows files, never checkpoints or models."""
