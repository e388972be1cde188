"""Checkpoint formats, one reader per format behind the one `Checkpoint` interface (`base`):
jstate's own (a manifest over an Orbax checkpoint, read straight from its OCDBT files where it
can), plain Orbax, TensorFlow tensor bundles, and safetensors."""
