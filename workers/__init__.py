"""Worker processes: pinned, poll queue pairs of any controller."""
