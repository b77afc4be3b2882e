"""Block backends behind one Protocol (ram, null, file)."""
