"""pipelines: one runnable config per paper table."""
