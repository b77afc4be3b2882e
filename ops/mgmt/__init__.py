"""Management plane: JSON-RPC 2.0 codec (sans-I/O) and the UNIX-socket server."""
from ops.mgmt.jsonrpc import ErrorCode, MgmtError, RpcError
from ops.mgmt.server import METHODS, ManagementApi, MgmtServer

__all__ = ["ErrorCode", "MgmtError", "RpcError", "METHODS", "ManagementApi", "MgmtServer"]
