"""Stage kinds: one module each, registered with @register_stage (the pipeline order is registry.STAGE_ORDER)."""

from engine.stages import clean, dataset, eval, export, source, train  # noqa: F401
