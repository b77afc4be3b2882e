"""NVMe device model, pure: no sockets, no processes; guest memory is injected."""
