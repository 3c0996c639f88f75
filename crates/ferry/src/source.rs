//! The manifest-directory source lives in the `ferry-source` crate; this re-export keeps the
//! agent's `crate::source::...` paths.

pub use ferry_source::{now_ms, read_dir, Reader, Snapshot};
