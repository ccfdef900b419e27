"""What the server knows between rounds (``ServerState``), its checkpoints, and the on-disk
store of the clients' states for large populations."""

from fedtransfer.state.checkpoint import load_state, save_state
from fedtransfer.state.server import Pending, ServerState

__all__ = ["Pending", "ServerState", "load_state", "save_state"]
