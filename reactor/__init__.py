"""The I/O edge and cross-process plumbing: supervisor, front-ends, coordinator, shm."""
