"""Admin command set: one module per command family, dispatched from `table`."""
