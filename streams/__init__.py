"""Streaming machinery: NATS JetStream source, decoding, windows, the window journal,
sinks (store, NATS, PostgreSQL) and per-window metrics. The flows live in
``flows/stream.py``; the design is in ``docs/streaming.md``."""
