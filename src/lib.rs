//! Shared helpers for the POS demo and the end-to-end tests.
