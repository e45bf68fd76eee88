"""Recipe: a declarative engine that turns a character's dialogue into a tuned, evaluated persona model."""

__version__ = "0.1.0"
