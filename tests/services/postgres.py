"""Embedded PostgreSQL fixture (session-scoped)."""
