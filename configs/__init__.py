"""ml_collections configs: python sample.py --config configs/<name>.py [--config.<field>=value ...]."""
