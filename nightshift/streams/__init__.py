"""The stream engine, one wing (``nightshift.streams``): the stream spec and its plan, the
per-stream loop (``runtime``) and the window processor, the NATS JetStream source,
decoding, windows, the window journal, sinks (store, NATS, PostgreSQL), per-window
metrics and the NATS and PostgreSQL credential blocks.

It builds on ``tasks/`` (operators, stages, the step task) and never imports ``flows/``;
the Prefect face, the ``stream`` flow of ``prefect.yaml``, is ``flows/stream.py``. The
design is in ``docs/streaming.md``."""
