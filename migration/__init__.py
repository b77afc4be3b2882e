"""Live migration, pure: the snapshot format, the state table, the wire adapters.

- `snapshot`: the one versioned blob format (magic, major.minor, section table,
  CRC-checked msgpack sections); live upgrade and saved files use it too.
- `states`: the v2 migration states, direct arcs and derived walks; v1 device_state
  bits mapped onto the same table.

Nothing here does I/O or imports the process layers (reactor, workers, ops).
"""
