"""train stage (being written)."""
