//! Integration tests live under `tests/tests/`; this library only hosts shared helpers.
