"""Prefect flows over the ttd library (thin: the logic lives in ttd/)."""
