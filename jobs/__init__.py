"""Ray entrypoints, one file per workflow: ``python -m jobs.<name> --help``."""
