"""Robustness evaluation: simulated attacks and the threat that wraps a round's clients."""
