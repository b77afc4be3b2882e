"""vfio-user protocol, sans-I/O: wire structs, message codec, negotiation, DMA table."""
