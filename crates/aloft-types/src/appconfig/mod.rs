//! The fly.toml model: parsing (current and v1 layouts), flyctl-compatible
//! normalisation, validation with line/column diagnostics, and conversion to the
//! Machines API config of a process group.
