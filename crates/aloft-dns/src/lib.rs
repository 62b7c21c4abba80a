//! `.internal` DNS for private networking: `<app>.internal`, `<region>.<app>.internal`
//! and `<machine>.vm.<app>.internal` answered from the catalog.
//!
//! It owns name resolution only. It must not write to the catalog.
