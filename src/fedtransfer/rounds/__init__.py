"""The round: ``server_round`` (``spine``), its stages (``distribute``, ``collect``,
``finalize``), the transport seam (``messages``), the simulated clients (``simulate``), staged
schedules (``schedule``) and FedBuff (``buffered``). Import from the modules: this package
imports nothing, so the client side can use ``messages`` without pulling in the server."""
