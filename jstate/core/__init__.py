"""The vocabulary every other folder shares: errors, variable names, pytree names, tables and
progress. It imports nothing of jstate's."""
