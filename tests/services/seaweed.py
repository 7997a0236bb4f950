"""SeaweedFS S3 server fixture (session-scoped)."""
