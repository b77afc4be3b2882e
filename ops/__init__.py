"""Operations: configuration, command lines (vnvmed, vnvmectl), the management RPC,
sd_notify, logging and process titles.  `reactor/` is the processes and I/O edges."""
