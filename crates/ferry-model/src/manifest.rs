//! Kubernetes-format manifests (multi-document YAML or JSON) -> [`Object`]s.

use crate::objects::Object;

/// Where a problem was found: file, 0-based document index, the object (Kind namespace/name when
/// known) and the field path (e.g. `spec.ports[0].port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub doc_index: usize,
    /// e.g. "Service default/web"; None when the document has no usable kind/name.
    pub object: Option<String>,
    /// e.g. "spec.ports[0].port"; empty when the whole document is at fault.
    pub field: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} document {}", self.file, self.doc_index)?;
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if !self.field.is_empty() {
            write!(f, " field {}", self.field)?;
        }
        Ok(())
    }
}

/// A document (or object) that was dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub at: Location,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Something ignored but kept going (unknown kind, ...).
pub type ManifestWarning = ManifestError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub errors: Vec<ManifestError>,
    pub warnings: Vec<ManifestWarning>,
}

/// Parse one file's text. `file` is only used in messages. Never panics; a bad document only
/// drops that document (or, inside a `List`, that item).
pub fn parse_text(file: &str, text: &str) -> Parsed {
    let _ = (file, text);
    Parsed::default()
}
