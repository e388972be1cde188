"""Where checkpoints live: one interface over local disks and object stores (``gs://``,
``s3://``), the durability of local writes, and the deadlines of remote requests. It knows
files, never checkpoints or models."""
