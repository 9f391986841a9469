"""The base layer (``nightshift.core``): errors and ``one_line``, fingerprints, Parquet and
JSON files (``file_io``), locks, the store's output inventory, token usage and prices,
the embedded model, the model-weights identity and artifact names. It imports nothing of
nightshift above it (docs/layout.md)."""
