//! SQLite specifics the conformance suite cannot see.
