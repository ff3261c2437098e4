"""Offline proof: recorded real outcomes replayed through the router's own judgements (never gateway/)."""
