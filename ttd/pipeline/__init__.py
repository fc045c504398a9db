"""The library side of the Prefect flow: the run configuration (`runconfig`), the flow's units of work keyed by
their inputs (`units`) and secret masking for logs (`redact`). Prefect itself is imported only by `flows/` and the
CLI."""
