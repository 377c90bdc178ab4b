"""End-to-end pipelines (one per model family)."""
