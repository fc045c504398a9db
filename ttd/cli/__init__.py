"""The `ttd` command line (`main`), its `run` command for the Prefect flow (`run`: with `flows/`, the only place
that imports Prefect) and `ttd demo` (`demo`)."""
