"""Live migration (not implemented yet: see the issue tracker)."""
