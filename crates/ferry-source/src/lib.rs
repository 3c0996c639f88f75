//! Where ferry's objects come from.
//!
//! ferry-model holds the types ferry works with (`Service`, `EndpointSlice`, pools, ...) and
//! the policies over them; this crate reads them from a source and converts them into those
//! types:
//!
//! - [`manifest`]: one file's text (multi-document YAML or JSON, `List`s) into objects, with
//!   errors and warnings that name the file, the document, the object and the field.
//!   [`manifest::split_objects`] gives the objects before decoding, for callers with kinds of
//!   their own (the lab's Deployments and Pods).
//! - [`decode`]: one object into its typed Kubernetes form — `k8s-openapi`'s types (one
//!   Kubernetes version feature, `v1_33`, for the whole workspace) and [`metallb`]'s derived
//!   types — with `serde_path_to_error`'s field path and messages in ferry's words.
//! - [`kinds`]: the checks the API server makes on the fields ferry uses ([`check`] holds the
//!   shared ones: names, ports, protocols, selectors), then the one conversion into
//!   ferry-model's type. A Kubernetes API source hands the same typed objects to the same
//!   functions.
//! - [`dir`]: a directory of manifests read as one [`Snapshot`] of the cluster, re-parsing only
//!   the files that changed ([`Reader`]).
//!
//! # Why serde-saphyr
//!
//! `serde_yaml` is deprecated and unmaintained. Of its successors, `serde_yaml_ng` and
//! `serde_norway` are forks that keep its `unsafe-libyaml` core (libyaml translated from C to
//! unsafe Rust). `serde-saphyr` is a YAML parser in safe Rust (saphyr's parser) that does not
//! panic on input, has budgets against alias bombs and deep nesting, reports errors with line
//! and column, reads multi-document streams, applies merge keys and rejects duplicate keys, and
//! deserializes straight into `serde_json::Value` or typed structs: Kubernetes itself converts
//! YAML to JSON before decoding, so reading YAML into JSON values and then into the Kubernetes
//! types is the same path the API server takes. The options ferry reads YAML with are in
//! [`ferry_model::yaml`] (the model reads MetalLB's legacy ConfigMap, which embeds YAML).

pub mod check;
pub mod decode;
pub mod dir;
pub mod kinds;
pub mod manifest;
pub mod metallb;

pub use dir::{manifest_files, now_ms, read_dir, Reader, Snapshot};
