"""Model-level building blocks. Nothing in this package imports Ray."""
