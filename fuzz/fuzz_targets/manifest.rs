//! The manifest reader on any file content: bytes (as UTF-8, lossily, as the directory reader
//! does) into `parse_text` and `split_objects`.
//!
//! Properties: no panic; every error and warning names this file and a document that exists,
//! says something, and prints as "FILE document N ..."; every object `split_objects` returns
//! has a kind and an apiVersion; `split_objects`' errors are among `parse_text`'s, in order.
#![no_main]

use ferry_source::manifest::{documents, parse_text, split_objects};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let docs = documents(&text).len();

    let parsed = parse_text(FILE, &text);
    for e in parsed.errors.iter().chain(&parsed.warnings) {
        assert_eq!(e.at.file, FILE, "{e}");
        assert!(e.at.doc_index < docs, "{e}: only {docs} documents");
        assert!(!e.message.trim().is_empty(), "{e:?}");
        let shown = e.to_string();
        let at = format!("{FILE} document {}", e.at.doc_index);
        assert!(
            shown.starts_with(&at),
            "{shown:?} does not start with {at:?}"
        );
        if let Some(object) = &e.at.object {
            assert!(!object.is_empty(), "{e:?}");
        }
    }

    let (objects, errors) = split_objects(FILE, &text);
    for o in &objects {
        assert_eq!(o.file, FILE);
        assert!(o.doc_index < docs, "{o:?}: only {docs} documents");
        assert!(!o.kind.is_empty() && !o.api_version.is_empty(), "{o:?}");
        assert!(o.value.is_object(), "{o:?}");
    }
    let mut rest = parsed.errors.iter();
    for e in &errors {
        assert!(
            rest.any(|p| p == e),
            "split_objects' error {e} is not among parse_text's (in order): {:?}",
            parsed.errors
        );
    }
});
