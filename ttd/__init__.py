"""ttd: Text-Tag Self-Distillation (ECCV 2024) as a reproducible data pipeline."""

__version__ = "0.1.0"
