"""Persistence: the artifact store (local directory, S3), the SQL registry, settings.

Sits above `randes` (core) and below `flows` (Prefect + CLI); imports nothing from `flows`.
"""
