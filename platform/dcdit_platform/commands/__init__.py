"""Sub-commands of the `dcdit` CLI, one module each."""
