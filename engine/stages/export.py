"""export stage (being written)."""
