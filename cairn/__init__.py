"""cairn: encrypted, deduplicated, compressed backups on a parallel pipeline engine."""

__version__ = "0.1.0"
