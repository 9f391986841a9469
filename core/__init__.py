"""The base layer: errors, fingerprints, Parquet and JSON files, locks, the store's
inventory, token usage and prices, and the model-weights identity. Imports nothing of
nightshift above it."""
