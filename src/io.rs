//! batch files
