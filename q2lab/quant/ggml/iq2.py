"""IQ2 types (placeholder)."""
