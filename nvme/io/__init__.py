"""NVM I/O command set: executor and the table of supported opcodes."""
from .executor import IoExecutor
from .opcodes import (FUSES, IO_COMMAND_EFFECTS, NAMESPACE_WRITE_PROTECTED, ONCS, SGLS,
                      SUPPORTED_IO_OPCODES, VWC, IoOpcode)

__all__ = ["IoExecutor", "IoOpcode", "IO_COMMAND_EFFECTS", "SUPPORTED_IO_OPCODES", "ONCS",
           "FUSES", "SGLS", "VWC", "NAMESPACE_WRITE_PROTECTED"]
