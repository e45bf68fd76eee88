"""dataset stage (being written)."""
