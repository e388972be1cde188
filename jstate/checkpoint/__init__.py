"""The checkpoint side, over everything else: the `Saver`, name mapping and transforms, saving
(the writer, retention) and restoring, and finding checkpoints in a directory."""
