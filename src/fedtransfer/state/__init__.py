"""What the server knows between rounds (``ServerState``), its checkpoints, and the on-disk
store of the clients' states for large populations."""

from fedtransfer.state.checkpoint import load_history, load_state, save_state
from fedtransfer.state.server import ClientHoldings, Distribution, InFlight, Pending, ServerState

__all__ = [
    "ClientHoldings",
    "Distribution",
    "InFlight",
    "Pending",
    "ServerState",
    "load_history",
    "load_state",
    "save_state",
]
