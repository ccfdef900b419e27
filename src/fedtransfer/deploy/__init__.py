"""Deployment: a federation of separate processes and machines, on Flower's deployment engine.

:mod:`.federation` holds the transport-free server round and client round (the simulator's own
steps); :mod:`.flower` carries them in Flower messages (the only module that speaks Flower's
words); :mod:`.launch` makes certificates, keys and the Flower app, and starts the processes.
"""
