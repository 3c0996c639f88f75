//! YAML text to a JSON value, with the options ferry reads every YAML with.
//!
//! ferry reads YAML with `serde-saphyr` (safe Rust, never panics on input, budgets against
//! alias bombs and deep nesting, errors with line and column) into `serde_json::Value`, the
//! JSON data model Kubernetes itself converts YAML into: mapping keys are strings, and YAML
//! tags are dropped. Booleans are strict (`yes`/`on` stay strings, as in YAML 1.2 and
//! `serde_yaml` before), duplicate keys are an error and merge keys (`<<`) are applied.

use serde_json::Value;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    }
}

/// One YAML document (or nothing: null) as a JSON value; the error names line and column.
pub fn from_str(text: &str) -> Result<Value, String> {
    serde_saphyr::from_str_with_options::<Option<Value>>(text, options())
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

/// One YAML document into any deserializable type, with the same options.
pub fn from_str_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_saphyr::from_str_with_options::<T>(text, options()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values() {
        assert_eq!(from_str("").unwrap(), Value::Null);
        assert_eq!(from_str("# only a comment\n").unwrap(), Value::Null);
        let v = from_str("a: yes\nb: true\nc: 0x10\nd: 1.5\ne: ~\n").unwrap();
        assert_eq!(v["a"], "yes");
        assert_eq!(v["b"], true);
        assert_eq!(v["c"], 16);
        assert_eq!(v["d"], 1.5);
        assert_eq!(v["e"], Value::Null);
    }

    #[test]
    fn errors_name_the_line() {
        let e = from_str("a: 1\nb: [unclosed\n").unwrap_err();
        assert!(e.contains("line "), "{e}");
        let e = from_str("a: 1\na: 2\n").unwrap_err();
        assert!(e.contains("duplicate"), "{e}");
    }
}
