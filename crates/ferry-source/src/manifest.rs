//! Kubernetes-format manifests (multi-document YAML or JSON) -> [`Object`]s.
//!
//! [`parse_text`] turns the text of one manifest file into the [`Object`]s ferry understands,
//! plus a list of errors (objects that were dropped) and warnings (things that were ignored).
//! It never panics and never gives up on a whole file because of one bad document.
//!
//! # Documents
//!
//! The text is split into documents the way `kubectl` does: a line starting with `---`
//! (followed by nothing, blanks or a comment) starts a new document; a `...` line ends one.
//! Each document is then parsed on its own with `serde-saphyr` (see [`ferry_model::yaml`]),
//! so a YAML syntax error only loses the document it is in. Document indexes (`doc_index`,
//! 0-based) count every document
//! that is either explicitly started by `---` or contains something other than blanks and
//! comments: a leading comment block before the first `---` is not a document, an empty
//! `---` document is (and is skipped silently, as are comment-only documents).
//! Error messages from the YAML parser carry line numbers of the whole file.
//!
//! JSON is YAML, so a JSON file goes through the same path. A document that is not valid YAML
//! but is a stream of JSON values (`{...}{...}`, as `kubectl get -o json` may be concatenated)
//! is read as JSON, one document per value. YAML merge keys (`<<`) are applied.
//!
//! Each object then goes the way the API server takes it: its JSON value is decoded into the
//! typed Kubernetes object (`k8s-openapi`'s `Service`, `EndpointSlice`, ...; [`crate::metallb`]
//! for MetalLB's kinds) by [`crate::decode`], which names the field of the first value that
//! does not fit (`serde_path_to_error`); then [`crate::kinds`] checks the fields ferry uses as
//! the API server would and converts the object into ferry-model's type. The same conversions
//! take the objects a Kubernetes API client reads.
//!
//! A document (or a `List` item) that is not a mapping, lacks `kind`/`apiVersion`, or has a
//! field that does not validate is dropped whole, with an error naming the field path
//! (`spec.ports[1].port`, `items[3].spec.ports[0].port`, `metadata.labels[app]`). The checks
//! after decoding are collected per object, so one object may report several; a value of the
//! wrong type stops decoding, so it is reported alone.
//!
//! # Kinds
//!
//! | kind            | apiVersion            | becomes                        |
//! |-----------------|-----------------------|--------------------------------|
//! | `Service`       | `v1`                  | [`Object::Service`]            |
//! | `EndpointSlice` | `discovery.k8s.io/v1` | [`Object::EndpointSlice`]      |
//! | `Endpoints`     | `v1`                  | [`Object::EndpointSlice`]s     |
//! | `Node`          | `v1`                  | [`Object::Node`]               |
//! | `ConfigMap`     | `v1`                  | [`Object::ConfigMap`]          |
//! | `Namespace`     | `v1`                  | [`Object::Namespace`]          |
//! | `IPAddressPool` | `metallb.io/v1beta1`  | [`Object::IpAddressPool`]      |
//! | `L2Advertisement` | `metallb.io/v1beta1` | [`Object::L2Advertisement`]   |
//! | `BGPPeer`       | `metallb.io/v1beta2` (or `v1beta1`) | [`Object::BgpPeer`] |
//! | `BGPAdvertisement` | `metallb.io/v1beta1` | [`Object::BgpAdvertisement`] |
//! | `Community`     | `metallb.io/v1beta1`  | [`Object::Community`]          |
//! | `BFDProfile`    | `metallb.io/v1beta1`  | [`Object::BfdProfile`]         |
//! | `Secret`        | `v1`                  | [`Object::Secret`] (for BGPPeers' `passwordSecret`) |
//! | `List`          | `v1`                  | each of its `items`            |
//! | `<Kind>List`    | as `<Kind>`           | each of its `items` (items may omit `kind`/`apiVersion`) |
//!
//! A known kind with another apiVersion is an error (field `apiVersion`); any other kind is a
//! warning (`unknown kind X (apiVersion Y): ignored`). Deployments and Pods are such kinds
//! here: the lab runs them, and reads them with [`split_objects`] and [`RawObject::decode`].
//!
//! Validation follows the Kubernetes API server where ferry depends on the field (names,
//! ports, protocols, cluster IPs, ...); fields ferry does not use are ignored. As in
//! Kubernetes, a field set to `null` is the same as a missing field, and `nodePort: 0`,
//! `targetPort: 0` and `targetPort: ""` mean "not set".
//!
//! # Endpoints
//!
//! A v1 `Endpoints` object is converted to EndpointSlices the way the API server's mirroring
//! does, except that each subset becomes its own slice, because a subset's addresses pair only
//! with that subset's ports: subset `i` of Endpoints `web` becomes the slice `web-i`; if the
//! subset mixes IPv4 and IPv6 addresses it becomes two slices, `web-i-ipv4` and `web-i-ipv6`.
//! Subsets without addresses produce no slice. `service_name` is the Endpoints name; the labels
//! and annotations are copied and the label `kubernetes.io/service-name` is set; the uid is not
//! copied (it would no longer be unique). `addresses` are ready and serving, `notReadyAddresses`
//! neither; none are terminating.
//!
//! # MetalLB
//!
//! IPAddressPool and L2Advertisement are read as MetalLB (0.13 and later) defines them; their
//! label selectors (`matchLabels`, `matchExpressions` with In, NotIn, Exists, DoesNotExist)
//! are checked as Kubernetes does. Each IPAddressPool address is checked with
//! [`ferry_model::pools::parse_address_entry`]; overlaps between pools and duplicate names are
//! checked by [`ferry_model::pools::load`], which sees all pools. MetalLB's legacy ConfigMap
//! (`metallb-system/config`) is an ordinary ConfigMap here; [`ferry_model::pools::load`] reads it.
//! BGPPeer, BGPAdvertisement, Community and BFDProfile are read with their types checked
//! (and MetalLB's FRR-only peer fields refused or ignored, see [`kinds::bgp_peer`]); their
//! values (ASNs, addresses, timers, communities, ...) are checked by
//! [`ferry_model::bgp::load`], which sees them all with the pools and Secrets.
//!
//! FQDN EndpointSlices are accepted (their addresses are checked to be DNS names) but
//! [`ferry_model::objects::Endpoint`] holds IP addresses only, so their endpoints come out with
//! empty `addresses` and a warning says so.

use ferry_model::Object;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde_json::Value;

use crate::check::{join, quote, Ck, Scope};
use crate::{kinds, metallb};

/// A YAML/JSON mapping (keys are strings, as in JSON).
type Mapping = serde_json::Map<String, Value>;

/// Where a problem was found: file, 0-based document index, the object (Kind namespace/name when
/// known) and the field path (e.g. `spec.ports[0].port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub doc_index: usize,
    /// e.g. "Service default/web"; None when the document has no usable kind/name.
    pub object: Option<String>,
    /// e.g. `spec.ports[0].port`; empty when the whole document is at fault.
    pub field: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Objects from the Kubernetes API have no file: they are named by kind and name alone.
        match (&self.object, self.file.is_empty()) {
            (Some(o), true) => write!(f, "{o}")?,
            (None, true) => write!(f, "an object")?,
            (o, false) => {
                write!(f, "{} document {}", self.file, self.doc_index)?;
                if let Some(o) = o {
                    write!(f, " ({o})")?;
                }
            }
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
    let mut out = Parsed::default();
    for item in split(file, text) {
        match item {
            Ok(raw) => parse_object_into(&mut out, &raw),
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// One object of a manifest file before it is decoded: a document, or an item of a `List`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawObject {
    pub file: String,
    pub doc_index: usize,
    /// Where the object is inside its document: "" or `items[3]` (prefix of field paths).
    pub base: String,
    pub kind: String,
    pub api_version: String,
    /// The object; for the items of a `<Kind>List` with `kind` and `apiVersion` filled in.
    pub value: Value,
}

impl RawObject {
    /// `metadata.name`, when it is a non-empty string.
    pub fn name(&self) -> Option<&str> {
        self.value
            .get("metadata")?
            .get("name")?
            .as_str()
            .filter(|s| !s.is_empty())
    }

    /// `metadata.namespace`: "default" when left out, "" for cluster-scoped kinds.
    pub fn namespace(&self) -> &str {
        if scope_of(&self.kind) == Scope::Cluster {
            return "";
        }
        self.value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }

    /// "Service default/web", when the object has a name.
    /// For kinds this crate does not know, the namespace shows only when written.
    pub fn describe(&self) -> Option<String> {
        let m = self.value.as_object()?;
        describe_object(&self.kind, m, lookup_kind(&self.kind).map(|k| k.scope))
    }

    /// "Pod default/web", for a kind of the given scope.
    pub fn describe_in(&self, scope: Scope) -> Option<String> {
        let m = self.value.as_object()?;
        describe_object(&self.kind, m, Some(scope))
    }

    /// A problem at `field` (relative to the object) of this object.
    pub fn problem(&self, field: &str, message: impl Into<String>) -> ManifestError {
        ManifestError {
            at: Location {
                file: self.file.clone(),
                doc_index: self.doc_index,
                object: self.describe(),
                field: join(&self.base, field),
            },
            message: message.into(),
        }
    }

    /// Decode as the typed object `T` (see [`crate::decode`]), with the `metadata` required as
    /// the API server does; problems go to `ck` with fields relative to the object.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, ck: &mut Ck, maps: &[&str]) -> Option<T> {
        if self.value.get("metadata").is_none_or(Value::is_null) {
            ck.err("metadata", "required");
        }
        typed(ck, &self.value, maps)
    }

    /// `ck`'s problems as errors and warnings of this object, into `out`.
    pub fn report(&self, ck: Ck, out: &mut Parsed) {
        for (field, message) in ck.warnings {
            out.warnings.push(self.problem(&field, message));
        }
        for (field, message) in ck.errors {
            out.errors.push(self.problem(&field, message));
        }
    }
}

/// Cluster-scoped kinds (no namespace): ferry's own and the common built-in ones.
const CLUSTER_SCOPED: &[&str] = &[
    "Node",
    "Namespace",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "CustomResourceDefinition",
    "IngressClass",
    "PriorityClass",
];

/// Whether objects of `kind` live in a namespace.
pub fn scope_of(kind: &str) -> Scope {
    if CLUSTER_SCOPED.contains(&kind) {
        Scope::Cluster
    } else {
        Scope::Namespaced
    }
}

/// The objects of one file's text: documents (see [`documents`]) with `List`s unpacked, each
/// with `kind` and `apiVersion`. Documents that are not valid YAML, are not a mapping or lack
/// `kind`/`apiVersion` are errors.
pub fn split_objects(file: &str, text: &str) -> (Vec<RawObject>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for item in split(file, text) {
        match item {
            Ok(raw) => objects.push(raw),
            Err(e) => errors.push(e),
        }
    }
    (objects, errors)
}

/// Objects and errors in the order of the file.
fn split(file: &str, text: &str) -> Vec<Result<RawObject, ManifestError>> {
    let mut out = Vec::new();
    for (doc_index, doc) in documents(text).into_iter().enumerate() {
        let site = Site { file, doc_index };
        match doc {
            Ok(value) if value.is_null() => {} // empty or comment-only document
            Ok(value) => split_object(&mut out, &site, "", value, None, 0),
            Err(message) => out.push(Err(site.problem(None, String::new(), message))),
        }
    }
    out
}

/// Parse one document already read (see [`documents`]); `doc_index` is only used in messages.
/// A null document is nothing.
pub fn parse_document(file: &str, doc_index: usize, value: &Value) -> Parsed {
    let mut items = Vec::new();
    let mut out = Parsed::default();
    if !value.is_null() {
        let site = Site { file, doc_index };
        split_object(&mut items, &site, "", value.clone(), None, 0);
    }
    for item in items {
        match item {
            Ok(raw) => parse_object_into(&mut out, &raw),
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// Parse one object: a kind ferry knows becomes model objects (or errors); any other kind is
/// a warning.
pub fn parse_object(raw: &RawObject) -> Parsed {
    let mut out = Parsed::default();
    parse_object_into(&mut out, raw);
    out
}

// ---------------------------------------------------------------------------------------------
// Documents

/// How deeply `List`s may nest inside `List`s.
const MAX_LIST_DEPTH: usize = 8;

/// One document's text inside the file.
struct Chunk<'a> {
    text: &'a str,
    /// Lines of the file before this chunk, to turn chunk line numbers into file line numbers.
    line_offset: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// `---`: a document starts here.
    Start,
    /// `...`: the document ends with this line.
    End,
    /// `%YAML ...`: belongs to the next document.
    Directive,
    /// Blank or comment.
    Blank,
    Content,
}

fn is_marker(line: &str, marker: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    match line.strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t']),
        None => false,
    }
}

fn classify(line: &str) -> LineKind {
    if is_marker(line, "---") {
        return LineKind::Start;
    }
    if is_marker(line, "...") {
        return LineKind::End;
    }
    if line.starts_with('%') {
        return LineKind::Directive;
    }
    let t = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if t.is_empty() || t.starts_with('#') {
        LineKind::Blank
    } else {
        LineKind::Content
    }
}

/// Split the text into documents like kubectl's YAML reader: at `---` lines (and after `...`
/// lines). Chunks that hold nothing but blanks and comments and do not start with `---` are
/// not documents.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    struct Open {
        start_byte: usize,
        start_line: usize,
        explicit: bool,
        content: bool,
    }
    let mut chunks = Vec::new();
    let mut close = |open: &Open, end_byte: usize| {
        if open.explicit || open.content {
            chunks.push(Chunk {
                text: text.get(open.start_byte..end_byte).unwrap_or(""),
                line_offset: open.start_line,
            });
        }
    };
    let mut open = Open {
        start_byte: 0,
        start_line: 0,
        explicit: false,
        content: false,
    };
    // First line of a run of directives (and blanks) waiting for their `---`.
    let mut directives: Option<(usize, usize)> = None;
    let mut byte = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        match classify(line) {
            LineKind::Start => {
                let (cut_byte, cut_line) = directives.take().unwrap_or((byte, line_no));
                close(&open, cut_byte);
                open = Open {
                    start_byte: cut_byte,
                    start_line: cut_line,
                    explicit: true,
                    content: false,
                };
            }
            LineKind::End => {
                let end = byte + line.len();
                close(&open, end);
                directives = None;
                open = Open {
                    start_byte: end,
                    start_line: line_no + 1,
                    explicit: false,
                    content: false,
                };
            }
            LineKind::Directive => {
                directives.get_or_insert((byte, line_no));
            }
            LineKind::Blank => {}
            LineKind::Content => {
                open.content = true;
                directives = None;
            }
        }
        byte += line.len();
    }
    if directives.is_some() {
        open.content = true; // a directive with no document after it: let the parser complain
    }
    close(&open, text.len());
    chunks
}

/// The documents of a file's text, split as kubectl does (see the module docs), each read as
/// YAML (or a stream of JSON values); one entry per document index, in order, `Err` with the
/// parser's message (line numbers of the whole file) for a document that is not valid YAML.
/// Empty documents are `Value::Null`.
pub fn documents(text: &str) -> Vec<Result<Value, String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // byte order mark
    let mut docs = Vec::new();
    for chunk in split_documents(text) {
        match ferry_model::yaml::from_str(chunk.text) {
            Ok(value) => docs.push(Ok(value)),
            Err(e) => match json_documents(chunk.text) {
                Some(values) => docs.extend(values.into_iter().map(Ok)),
                None => docs.push(Err(format!(
                    "invalid YAML: {}",
                    shift_line_numbers(&e.to_string(), chunk.line_offset)
                ))),
            },
        }
    }
    docs
}

/// A stream of JSON values (`{..}{..}` or `{..}\n{..}`), if the text is exactly that.
fn json_documents(text: &str) -> Option<Vec<Value>> {
    let body = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if !(body.starts_with('{') || body.starts_with('[')) {
        return None;
    }
    let mut values = Vec::new();
    for item in serde_json::Deserializer::from_str(body).into_iter::<serde_json::Value>() {
        values.push(item.ok()?);
    }
    (!values.is_empty()).then_some(values)
}

/// Add `offset` to every "line N column M" in a parser message.
fn shift_line_numbers(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(pos) = rest.find("line ") {
        let (before, after) = rest.split_at(pos + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let (number, tail) = after.split_at(digits);
        match number.parse::<usize>() {
            Ok(n) if tail.starts_with(" column ") || tail.starts_with(", column ") => {
                out.push_str(&n.saturating_add(offset).to_string())
            }
            _ => out.push_str(number),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Objects

/// The document being looked at.
struct Site<'a> {
    file: &'a str,
    doc_index: usize,
}

impl Site<'_> {
    fn problem(&self, object: Option<&str>, field: String, message: String) -> ManifestError {
        ManifestError {
            at: Location {
                file: self.file.to_string(),
                doc_index: self.doc_index,
                object: object.map(str::to_string),
                field,
            },
            message,
        }
    }
}

type KindParser = fn(&mut Ck, &RawObject) -> Vec<Object>;

struct KindSpec {
    kind: &'static str,
    api_version: &'static str,
    /// Older versions also read (the same fields): BGPPeer `metallb.io/v1beta1`.
    older_versions: &'static [&'static str],
    scope: Scope,
    parse: KindParser,
}

impl KindSpec {
    fn accepts(&self, api_version: &str) -> bool {
        self.api_version == api_version || self.older_versions.contains(&api_version)
    }
}

const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: "Service",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_service,
    },
    KindSpec {
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_endpoint_slice,
    },
    KindSpec {
        kind: "Endpoints",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_endpoints,
    },
    KindSpec {
        kind: "Node",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Cluster,
        parse: parse_node,
    },
    KindSpec {
        kind: "ConfigMap",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_config_map,
    },
    KindSpec {
        kind: "Namespace",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Cluster,
        parse: parse_namespace,
    },
    KindSpec {
        kind: "IPAddressPool",
        api_version: "metallb.io/v1beta1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_ip_address_pool,
    },
    KindSpec {
        kind: "L2Advertisement",
        api_version: "metallb.io/v1beta1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_l2_advertisement,
    },
    KindSpec {
        kind: "BGPPeer",
        api_version: "metallb.io/v1beta2",
        older_versions: &["metallb.io/v1beta1"],
        scope: Scope::Namespaced,
        parse: parse_bgp_peer,
    },
    KindSpec {
        kind: "BGPAdvertisement",
        api_version: "metallb.io/v1beta1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_bgp_advertisement,
    },
    KindSpec {
        kind: "Community",
        api_version: "metallb.io/v1beta1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_community,
    },
    KindSpec {
        kind: "BFDProfile",
        api_version: "metallb.io/v1beta1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_bfd_profile,
    },
    KindSpec {
        kind: "Secret",
        api_version: "v1",
        older_versions: &[],
        scope: Scope::Namespaced,
        parse: parse_secret,
    },
];

fn lookup_kind(kind: &str) -> Option<&'static KindSpec> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// `kind` or `apiVersion` of an object (or what its typed list implies).
fn header<'a>(m: &'a Mapping, key: &str, inherited: Option<&'a str>) -> Result<&'a str, String> {
    match get(m, key) {
        None => inherited.ok_or_else(|| "required".to_string()),
        Some(Value::String(s)) if s.is_empty() => Err("required".to_string()),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("must be a string, got {}", describe(other))),
    }
}

/// "Service default/web" from the raw metadata, when there is a name.
fn describe_object(kind: &str, m: &Mapping, scope: Option<Scope>) -> Option<String> {
    let md = get(m, "metadata")?.as_object()?;
    let name = get(md, "name")?.as_str().filter(|s| !s.is_empty())?;
    let ns = get(md, "namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    Some(match (scope, ns) {
        (Some(Scope::Cluster), _) => format!("{kind} {name}"),
        (Some(Scope::Namespaced), ns) => format!("{kind} {}/{name}", ns.unwrap_or("default")),
        (None, Some(ns)) => format!("{kind} {ns}/{name}"),
        (None, None) => format!("{kind} {name}"),
    })
}

/// One document or `List` item at `base` (empty for a document) into `objects`.
fn split_object(
    out: &mut Vec<Result<RawObject, ManifestError>>,
    site: &Site<'_>,
    base: &str,
    value: Value,
    inherited: Option<(&str, &str)>,
    depth: usize,
) {
    let Some(m) = value.as_object() else {
        let what = if base.is_empty() {
            "a document"
        } else {
            "a list item"
        };
        out.push(Err(site.problem(
            None,
            base.to_string(),
            format!(
                "{what} must be a mapping (a Kubernetes object with apiVersion and kind), got {}",
                describe(&value)
            ),
        )));
        return;
    };
    let kind = header(m, "kind", inherited.map(|i| i.0));
    let api_version = header(m, "apiVersion", inherited.map(|i| i.1));
    let (kind, api_version) = match (kind, api_version) {
        (Ok(k), Ok(a)) => (k.to_string(), a.to_string()),
        (kind, api_version) => {
            let object = kind
                .as_ref()
                .ok()
                .and_then(|k| describe_object(k, m, lookup_kind(k).map(|s| s.scope)));
            for (key, result) in [("kind", kind), ("apiVersion", api_version)] {
                if let Err(message) = result {
                    out.push(Err(site.problem(
                        object.as_deref(),
                        join(base, key),
                        message,
                    )));
                }
            }
            return;
        }
    };

    // Lists: `List` (items carry their own kind) or `<Kind>List` (items may omit it and take
    // the list's apiVersion, which must be the kind's when ferry knows the kind).
    let list_of = if kind == "List" {
        Some(None)
    } else {
        kind.strip_suffix("List")
            .filter(|k| !k.is_empty())
            .map(|k| Some(k.to_string()))
    };
    if let Some(item_kind) = list_of {
        let expected = match &item_kind {
            None => Some("v1"),
            Some(k) => lookup_kind(k)
                .filter(|s| !s.accepts(&api_version))
                .map(|s| s.api_version),
        };
        if let Some(expected) = expected.filter(|e| *e != api_version) {
            out.push(Err(site.problem(
                None,
                join(base, "apiVersion"),
                format!(
                    "kind {kind} needs apiVersion {expected}, got {}",
                    quote(&api_version)
                ),
            )));
            return;
        }
        if depth >= MAX_LIST_DEPTH {
            out.push(Err(site.problem(
                None,
                base.to_string(),
                format!("Lists nested more than {MAX_LIST_DEPTH} deep"),
            )));
            return;
        }
        let items_path = join(base, "items");
        let Value::Object(mut m) = value else {
            return;
        };
        match m.remove("items") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                let inherited = item_kind.as_deref().map(|k| (k, api_version.as_str()));
                for (i, item) in items.into_iter().enumerate() {
                    split_object(
                        out,
                        site,
                        &format!("{items_path}[{i}]"),
                        item,
                        inherited,
                        depth + 1,
                    );
                }
            }
            Some(other) => out.push(Err(site.problem(
                None,
                items_path,
                format!("must be a list, got {}", describe(&other)),
            ))),
        }
        return;
    }

    let mut value = value;
    if let Some(m) = value.as_object_mut() {
        m.insert("kind".to_string(), Value::String(kind.clone()));
        m.insert("apiVersion".to_string(), Value::String(api_version.clone()));
    }
    out.push(Ok(RawObject {
        file: site.file.to_string(),
        doc_index: site.doc_index,
        base: base.to_string(),
        kind,
        api_version,
        value,
    }));
}

fn parse_object_into(out: &mut Parsed, raw: &RawObject) {
    let (kind, api_version) = (raw.kind.as_str(), raw.api_version.as_str());
    let Some(spec) = lookup_kind(kind) else {
        if let Some(known) = KINDS.iter().find(|k| k.kind.eq_ignore_ascii_case(kind)) {
            out.errors.push(raw.problem(
                "kind",
                format!(
                    "unknown kind {kind} (kinds are case-sensitive: did you mean {}?)",
                    known.kind
                ),
            ));
        } else {
            out.warnings.push(raw.problem(
                "",
                format!("unknown kind {kind} (apiVersion {api_version}): ignored"),
            ));
        }
        return;
    };
    if !spec.accepts(api_version) {
        out.errors.push(raw.problem(
            "apiVersion",
            format!(
                "kind {kind} needs apiVersion {}, got {}",
                spec.api_version,
                quote(api_version)
            ),
        ));
        return;
    }
    let mut ck = Ck::default();
    let objects = (spec.parse)(&mut ck, raw);
    if ck.errors.is_empty() {
        out.objects.extend(objects);
    }
    raw.report(ck, out);
}

// ---------------------------------------------------------------------------------------------
// Reading values

/// `m[key]`; `None` when missing or null (Kubernetes treats both alike).
fn get<'a>(m: &'a Mapping, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

/// A short description of a value for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {}", quote(s)),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Kinds: decode into the typed object, then check and convert (crate::kinds)

/// Decode `v` as `T` (see [`crate::decode`]); a problem goes to `ck`.
fn typed<T: serde::de::DeserializeOwned>(ck: &mut Ck, v: &Value, maps: &[&str]) -> Option<T> {
    match crate::decode::decode(v, maps) {
        Ok(t) => Some(t),
        Err(e) => {
            ck.err(e.field, e.message);
            None
        }
    }
}

fn parse_service(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::Service>(ck, &["spec.selector"])
        .map(|s| vec![Object::Service(kinds::service(ck, &s))])
        .unwrap_or_default()
}

fn parse_endpoint_slice(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<discovery::EndpointSlice>(ck, &[])
        .map(|s| vec![Object::EndpointSlice(kinds::endpoint_slice(ck, &s))])
        .unwrap_or_default()
}

#[allow(deprecated)] // Endpoints is deprecated in Kubernetes 1.33; files still hold them.
fn parse_endpoints(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::Endpoints>(ck, &[])
        .map(|e| {
            kinds::endpoints(ck, &e)
                .into_iter()
                .map(Object::EndpointSlice)
                .collect()
        })
        .unwrap_or_default()
}

fn parse_node(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::Node>(ck, &[])
        .map(|n| vec![Object::Node(kinds::node(ck, &n))])
        .unwrap_or_default()
}

fn parse_config_map(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::ConfigMap>(ck, &[])
        .map(|c| vec![Object::ConfigMap(kinds::config_map(ck, &c))])
        .unwrap_or_default()
}

fn parse_namespace(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::Namespace>(ck, &[])
        .map(|n| vec![Object::Namespace(kinds::namespace(ck, &n))])
        .unwrap_or_default()
}

fn parse_ip_address_pool(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::IPAddressPool>(ck, &[])
        .map(|p| vec![Object::IpAddressPool(kinds::ip_address_pool(ck, &p))])
        .unwrap_or_default()
}

fn parse_l2_advertisement(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::L2Advertisement>(ck, &[])
        .map(|l| vec![Object::L2Advertisement(kinds::l2_advertisement(ck, &l))])
        .unwrap_or_default()
}

fn parse_bgp_peer(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::BGPPeer>(ck, &[])
        .map(|p| vec![Object::BgpPeer(Box::new(kinds::bgp_peer(ck, &p)))])
        .unwrap_or_default()
}

fn parse_bgp_advertisement(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::BGPAdvertisement>(ck, &[])
        .map(|a| vec![Object::BgpAdvertisement(kinds::bgp_advertisement(ck, &a))])
        .unwrap_or_default()
}

fn parse_community(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::Community>(ck, &[])
        .map(|c| vec![Object::Community(kinds::community(ck, &c))])
        .unwrap_or_default()
}

fn parse_bfd_profile(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<metallb::BFDProfile>(ck, &[])
        .map(|b| vec![Object::BfdProfile(kinds::bfd_profile(ck, &b))])
        .unwrap_or_default()
}

fn parse_secret(ck: &mut Ck, raw: &RawObject) -> Vec<Object> {
    raw.decode::<core::Secret>(ck, &[])
        .map(|s| vec![Object::Secret(kinds::secret(ck, &s))])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::cidr::Cidr;
    use ferry_model::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    /// The seed's Deployment (a kind the agent does not read), as the lab ships it.
    const DEPLOYMENT_SEED: &str = include_str!("../../ferry-lab/manifests/seed/nextcloud-dev.yaml");

    const SERVICE_SEED: &str = r#"# nextcloud-dev-clusterip
---
apiVersion: v1
kind: Service
metadata:
  name: nextcloud-dev-clusterip
  labels:
    app: nextcloud
    environment: dev
spec:
  selector:
      app: nextcloud
      environment: dev
  type: ClusterIP
  ports:
    - port: 8080
      targetPort: 80
"#;

    const CONFIGMAP_SEED: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  namespace: metallb-system
  name: config
data:
  config: |
    address-pools:
    - name: default
      protocol: layer2
      addresses:
      - 192.168.2.200-192.168.2.225
"#;

    const NODEPORT_SEED: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: nextcloud-dev-nodeport
spec:
  selector:
    app: nextcloud
  type: NodePort
  ports:
  - port: 80
"#;

    const LOADBALANCER_SEED: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: nextcloud-dev-lb
  namespace: web
spec:
  selector:
    app: nextcloud
  type: LoadBalancer
  loadBalancerIP: 192.168.2.201
  externalTrafficPolicy: Local
  ports:
  - name: http
    port: 80
    targetPort: 80
  - name: https
    port: 443
    targetPort: https
    nodePort: 30443
status:
  loadBalancer:
    ingress:
    - ip: 192.168.2.201
    - hostname: lb.example.com
"#;

    fn parse(text: &str) -> Parsed {
        parse_text("test.yaml", text)
    }

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Exactly one object, no errors, no warnings.
    fn one(text: &str) -> Object {
        let p = parse(text);
        assert!(p.errors.is_empty(), "errors: {:#?}", p.errors);
        assert!(p.warnings.is_empty(), "warnings: {:#?}", p.warnings);
        assert_eq!(p.objects.len(), 1, "{:#?}", p.objects);
        p.objects.into_iter().next().unwrap()
    }

    fn service(text: &str) -> Service {
        match one(text) {
            Object::Service(s) => s,
            other => panic!("not a Service: {other:?}"),
        }
    }

    fn meta(name: &str, namespace: &str) -> Meta {
        Meta {
            name: name.to_string(),
            namespace: namespace.to_string(),
            ..Meta::default()
        }
    }

    /// A Service named web whose spec is the given flow-style YAML.
    fn svc(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n")
    }

    /// The document is dropped with (at least) an error at `field` whose message contains `msg`.
    #[track_caller]
    fn assert_error(text: &str, field: &str, msg: &str) -> ManifestError {
        let p = parse(text);
        assert!(p.objects.is_empty(), "object kept: {:#?}", p.objects);
        match p
            .errors
            .iter()
            .find(|e| e.at.field == field && e.message.contains(msg))
        {
            Some(e) => e.clone(),
            None => panic!(
                "no error at {field:?} containing {msg:?}; got {:#?}",
                p.errors
            ),
        }
    }

    // ---- seeds ----------------------------------------------------------------------------

    #[test]
    fn seed_clusterip_service() {
        let app = strings(&[("app", "nextcloud"), ("environment", "dev")]);
        let expected = Service {
            meta: Meta {
                labels: app.clone(),
                ..meta("nextcloud-dev-clusterip", "default")
            },
            type_: ServiceType::ClusterIP,
            cluster_ip: ClusterIpSpec::Auto,
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
                target_port: TargetPort::Number(80),
                node_port: None,
            }],
            selector: app,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ..Default::default()
        };
        assert_eq!(service(SERVICE_SEED), expected);
    }

    #[test]
    fn seed_configmap() {
        let expected = ConfigMap {
            meta: meta("config", "metallb-system"),
            data: strings(&[(
                "config",
                "address-pools:\n- name: default\n  protocol: layer2\n  addresses:\n  \
                 - 192.168.2.200-192.168.2.225\n",
            )]),
        };
        assert_eq!(one(CONFIGMAP_SEED), Object::ConfigMap(expected));
    }

    #[test]
    fn seed_nodeport_service() {
        let s = service(NODEPORT_SEED);
        assert_eq!(s.type_, ServiceType::NodePort);
        assert_eq!(s.meta.namespace, "default");
        assert_eq!(
            s.ports,
            vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(80),
                node_port: None,
            }]
        );
        assert_eq!(s.selector, strings(&[("app", "nextcloud")]));
    }

    #[test]
    fn seed_loadbalancer_service() {
        let s = service(LOADBALANCER_SEED);
        assert_eq!(s.type_, ServiceType::LoadBalancer);
        assert_eq!(s.meta.object_ref().to_string(), "web/nextcloud-dev-lb");
        assert_eq!(s.extra.load_balancer_ip, Some(ip("192.168.2.201")));
        assert_eq!(s.extra.load_balancer_ingress, vec![ip("192.168.2.201")]);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(
            s.ports,
            vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Number(80),
                    node_port: None,
                },
                ServicePort {
                    name: "https".into(),
                    protocol: Protocol::Tcp,
                    port: 443,
                    target_port: TargetPort::Name("https".into()),
                    node_port: Some(30443),
                },
            ]
        );
    }

    #[test]
    fn seeds_in_one_file() {
        let text = [
            DEPLOYMENT_SEED,
            SERVICE_SEED,
            "---\n",
            CONFIGMAP_SEED,
            "---\n",
            NODEPORT_SEED,
            "---\n",
            LOADBALANCER_SEED,
        ]
        .concat();
        let p = parse(&text);
        assert!(p.errors.is_empty(), "{p:#?}");
        let kinds: Vec<_> = p.objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, ["Service", "ConfigMap", "Service", "Service"]);
        // Deployments are the lab's business (ferry-lab reads them with this crate).
        assert_eq!(p.warnings.len(), 1, "{p:#?}");
        assert_eq!(
            p.warnings[0].message,
            "unknown kind Deployment (apiVersion apps/v1): ignored"
        );
    }

    // ---- documents ------------------------------------------------------------------------

    #[test]
    fn good_bad_good() {
        let bad = svc("{ports: [{port: 70000}]}");
        let text = format!("{NODEPORT_SEED}---\n{bad}---\n{CONFIGMAP_SEED}");
        let p = parse(&text);
        assert_eq!(p.objects.len(), 2, "{p:#?}");
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        let e = &p.errors[0];
        assert_eq!(e.at.doc_index, 1);
        assert_eq!(e.at.file, "test.yaml");
        assert_eq!(e.at.object.as_deref(), Some("Service default/web"));
        assert_eq!(e.at.field, "spec.ports[0].port");
        assert_eq!(e.message, "must be between 1 and 65535, got 70000");
        assert_eq!(
            e.to_string(),
            "test.yaml document 1 (Service default/web) field spec.ports[0].port: \
             must be between 1 and 65535, got 70000"
        );
    }

    #[test]
    fn empty_and_comment_only_documents_are_skipped_but_counted() {
        let text = format!(
            "# header comment\n---\n---\n# only a comment\n\n---\n{}---\n...\n---\n{}",
            NODEPORT_SEED,
            svc("{type: Bogus, ports: [{port: 1}]}")
        );
        let p = parse(&text);
        assert_eq!(p.objects.len(), 1, "{p:#?}");
        assert!(p.warnings.is_empty(), "{p:#?}");
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        // 0: empty, 1: comment only, 2: NodePort, 3: "...", 4: bad
        assert_eq!(p.errors[0].at.doc_index, 4);
        assert_eq!(p.errors[0].at.field, "spec.type");
        assert_eq!(parse("").objects.len(), 0);
        assert_eq!(parse("# nothing\n\n"), Parsed::default());
        assert_eq!(parse("---\n---\n...\n"), Parsed::default());
        assert_eq!(parse("\u{feff}---\n# x\n"), Parsed::default());
    }

    #[test]
    fn leading_comment_is_not_a_document() {
        let e = assert_error(
            &format!("# a comment\n\n---\n{}", svc("{ports: [{port: 0}]}")),
            "spec.ports[0].port",
            "got 0",
        );
        assert_eq!(e.at.doc_index, 0);
    }

    #[test]
    fn document_end_marker() {
        let text = format!("{NODEPORT_SEED}...\n{LOADBALANCER_SEED}...\n");
        let p = parse(&text);
        assert_eq!(p.objects.len(), 2, "{p:#?}");
        assert!(p.errors.is_empty());
    }

    #[test]
    fn yaml_syntax_error_in_the_middle() {
        let bad =
            "apiVersion: v1\nkind: Service\nmetadata: {name: b\nspec:\n  ports: [{port: 1}]\n";
        let text = format!("{NODEPORT_SEED}---\n{bad}---\n{CONFIGMAP_SEED}");
        let p = parse(&text);
        assert_eq!(p.objects.len(), 2, "{p:#?}");
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        let e = &p.errors[0];
        assert_eq!(e.at.doc_index, 1);
        assert_eq!(e.at.object, None);
        assert_eq!(e.at.field, "");
        assert!(e.message.starts_with("invalid YAML: "), "{}", e.message);
        // The NodePort seed has 10 lines, then "---": the broken mapping starts on line 14
        // of the file and the parser notices on a later line.
        let lines: Vec<usize> = e
            .message
            .split("line ")
            .skip(1)
            .filter_map(|s| s.split([' ', ',']).next()?.parse().ok())
            .collect();
        assert!(!lines.is_empty(), "{}", e.message);
        assert!(
            lines.iter().all(|&l| (12..=17).contains(&l)),
            "{}",
            e.message
        );
    }

    #[test]
    fn syntax_errors_do_not_stop_later_documents() {
        let text = format!("key: [unclosed\n---\n: : :\n\t- x\n---\n{NODEPORT_SEED}");
        let p = parse(&text);
        assert_eq!(p.objects.len(), 1, "{p:#?}");
        assert_eq!(p.errors.len(), 2, "{p:#?}");
        assert_eq!(p.errors[0].at.doc_index, 0);
        assert_eq!(p.errors[1].at.doc_index, 1);
    }

    #[test]
    fn documents_that_are_not_objects() {
        let e = assert_error("- a\n- b\n", "", "must be a mapping");
        assert_eq!(e.at.object, None);
        assert!(e.message.contains("got a list"), "{}", e.message);
        assert_error("just a string\n", "", "got string \"just a string\"");
        assert_error("42\n", "", "got number 42");
        assert_error("apiVersion: v1\nmetadata: {name: x}\n", "kind", "required");
        let e = assert_error(
            "kind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 1}]}\n",
            "apiVersion",
            "required",
        );
        assert_eq!(e.at.object.as_deref(), Some("Service default/x"));
        assert_error(
            "apiVersion: v1\nkind: [Service]\n",
            "kind",
            "must be a string",
        );
        assert_error(
            "apiVersion: 1\nkind: Service\n",
            "apiVersion",
            "must be a string",
        );
        let p = parse("apiVersion: v1\nmetadata: {}\n");
        let fields: Vec<_> = p.errors.iter().map(|e| e.at.field.as_str()).collect();
        assert_eq!(fields, ["kind"]);
        let p = parse("{}\n");
        let fields: Vec<_> = p.errors.iter().map(|e| e.at.field.as_str()).collect();
        assert_eq!(fields, ["kind", "apiVersion"]);
    }

    #[test]
    fn wrong_api_version() {
        let e = assert_error(
            "apiVersion: apps/v1\nkind: Service\nmetadata: {name: web, namespace: x}\n",
            "apiVersion",
            "kind Service needs apiVersion v1, got \"apps/v1\"",
        );
        assert_eq!(e.at.object.as_deref(), Some("Service x/web"));
        assert_error(
            "apiVersion: metallb.io/v1beta2\nkind: IPAddressPool\nmetadata: {name: d}\n",
            "apiVersion",
            "needs apiVersion metallb.io/v1beta1",
        );
        assert_error(
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n",
            "apiVersion",
            "needs apiVersion discovery.k8s.io/v1",
        );
        assert_error(
            "apiVersion: v2\nkind: List\nitems: []\n",
            "apiVersion",
            "needs apiVersion v1",
        );
    }

    #[test]
    fn unknown_kinds_are_warnings() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: shop}\n---\n\
                    apiVersion: metallb.io/v1beta1\nkind: ServiceBGPStatus\n\
                    metadata: {name: st, namespace: metallb-system}\n";
        let p = parse(text);
        assert!(p.objects.is_empty() && p.errors.is_empty(), "{p:#?}");
        assert_eq!(p.warnings.len(), 2);
        assert_eq!(
            p.warnings[0].message,
            "unknown kind Deployment (apiVersion apps/v1): ignored"
        );
        assert_eq!(p.warnings[0].at.object.as_deref(), Some("Deployment shop"));
        assert_eq!(p.warnings[1].at.doc_index, 1);
        assert_eq!(
            p.warnings[1].message,
            "unknown kind ServiceBGPStatus (apiVersion metallb.io/v1beta1): ignored"
        );
        assert_eq!(
            p.warnings[1].at.object.as_deref(),
            Some("ServiceBGPStatus metallb-system/st")
        );
        // A lowercase spelling of a known kind is a mistake, not an unknown kind.
        assert_error(
            "apiVersion: v1\nkind: service\nmetadata: {name: web}\n",
            "kind",
            "did you mean Service?",
        );
    }

    #[test]
    fn json_input() {
        let text = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Service\",\n\t\"metadata\": \
                    {\"name\": \"web\", \"namespace\": \"shop\", \"creationTimestamp\": null},\n\
                    \t\"spec\": {\n\t\t\"type\": \"NodePort\",\n\t\t\"selector\": {\"app\": \"web\"},\n\
                    \t\t\"ports\": [{\"name\": \"http\", \"port\": 80, \"targetPort\": \"http\", \
                    \"nodePort\": 30080, \"protocol\": \"TCP\"}]\n\t}\n}\n";
        let s = service(text);
        assert_eq!(s.meta.object_ref().to_string(), "shop/web");
        assert_eq!(s.meta.extra.creation_timestamp, None);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.ports[0].node_port, Some(30080));

        // Without tabs it is plain YAML; errors carry JSON paths too.
        let e = assert_error(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"ports": [{"port": 80}, {"name": "b", "port": 81}]}}"#,
            "spec.ports[0].name",
            "required when the Service has more than one port",
        );
        assert_eq!(e.at.object.as_deref(), Some("Service default/web"));
    }

    #[test]
    fn json_stream() {
        let a = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 1}]}}"#;
        let b = r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"k": "v"}}"#;
        let p = parse(&format!("{a}\n{b}\n"));
        assert!(p.errors.is_empty(), "{p:#?}");
        assert_eq!(p.objects.len(), 2);
        let p = parse(&format!("{a}{b}"));
        assert_eq!(p.objects.len(), 2, "{p:#?}");
        // Broken JSON: the YAML error is reported.
        let p = parse("{\"apiVersion\": \"v1\",,}");
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert!(p.errors[0].message.starts_with("invalid YAML"));
    }

    #[test]
    fn list_items() {
        let text = format!(
            "apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n\
             - {}\n- {}\n- apiVersion: v1\n  kind: ServiceAccount\n  metadata: {{name: sa}}\n\
             - {}\n- 7\n",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}"#,
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"ports": [{"port": 80}, {"name": "x", "port": 70000}]}}"#,
            r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}"#,
        );
        let p = parse(&text);
        let names: Vec<_> = p.objects.iter().map(|o| o.meta().name.as_str()).collect();
        assert_eq!(names, ["a", "c"], "{p:#?}");
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].at.field, "items[2]");
        let fields: Vec<_> = p.errors.iter().map(|e| e.at.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "items[1].spec.ports[0].name",
                "items[1].spec.ports[1].port",
                "items[4]"
            ]
        );
        assert!(p.errors.iter().all(|e| e.at.doc_index == 0));
        assert_eq!(p.errors[0].at.object.as_deref(), Some("Service default/b"));
        // An empty list is fine.
        assert_eq!(
            parse("apiVersion: v1\nkind: List\nitems: []\n"),
            Parsed::default()
        );
        assert_eq!(parse("apiVersion: v1\nkind: List\n"), Parsed::default());
        assert_error(
            "apiVersion: v1\nkind: List\nitems: {}\n",
            "items",
            "must be a list",
        );
    }

    #[test]
    fn nested_list_and_typed_list() {
        let text = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "a", "namespace": "n"}, "spec": {"ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"ports": [{"port": 0}]}}
            ]}
        ]}"#;
        let p = parse(text);
        assert_eq!(p.objects.len(), 1, "{p:#?}");
        assert_eq!(p.objects[0].meta().object_ref().to_string(), "n/a");
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert_eq!(p.errors[0].at.field, "items[1].items[0].spec.ports[0].port");
        assert_error(
            "apiVersion: apps/v1\nkind: ServiceList\nitems: []\n",
            "apiVersion",
            "needs apiVersion v1",
        );
        // Lists nested too deep are refused, not recursed into forever.
        let mut deep = String::from("{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": []}");
        for _ in 0..20 {
            deep = format!("{{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [{deep}]}}");
        }
        let p = parse(&deep);
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert!(p.errors[0].message.contains("nested"));
    }

    // ---- Service --------------------------------------------------------------------------

    #[test]
    fn service_defaults_and_fields() {
        let s = service(&svc(
            "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
             ports: [{name: dns, port: 53, protocol: UDP, targetPort: 0}, \
                     {name: dns-tcp, port: 53, targetPort: dns-tcp}], \
             externalIPs: [192.0.2.1, '2001:db8::1'], internalTrafficPolicy: Local, \
             externalTrafficPolicy: Global}",
        ));
        assert_eq!(s.cluster_ip, ClusterIpSpec::Ip(ip("10.96.0.10")));
        assert_eq!(s.ports[0].protocol, Protocol::Udp);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(53));
        assert_eq!(s.ports[1].protocol, Protocol::Tcp);
        assert_eq!(s.ports[1].target_port, TargetPort::Name("dns-tcp".into()));
        assert_eq!(
            s.extra.external_ips,
            vec![ip("192.0.2.1"), ip("2001:db8::1")]
        );
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert!(s.selector.is_empty());

        let s = service(&svc("{clusterIPs: ['fd00::5'], ports: [{port: 1}]}"));
        assert_eq!(s.cluster_ip, ClusterIpSpec::Ip(ip("fd00::5")));
        let s = service(&svc("{clusterIP: '', ports: [{port: 1, nodePort: 0}]}"));
        assert_eq!(s.cluster_ip, ClusterIpSpec::Auto);
        assert_eq!(s.ports[0].node_port, None);
    }

    #[test]
    fn ip_families_and_policy() {
        let s = service(&svc(
            "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
             ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 1}]}",
        ));
        assert_eq!(s.cluster_ip, ClusterIpSpec::Ip(ip("10.96.0.10")));
        assert_eq!(s.extra.secondary_cluster_ip, Some(ip("fd00::10")));
        assert_eq!(s.ip_families, vec![IpFamily::IPv4, IpFamily::IPv6]);
        assert_eq!(
            s.effective_ip_family_policy(),
            IpFamilyPolicy::RequireDualStack
        );
        let s = service(&svc(
            "{ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv6], ports: [{port: 1}]}",
        ));
        assert_eq!(s.ip_families, vec![IpFamily::IPv6]);
        assert_eq!(s.ip_family_policy, Some(IpFamilyPolicy::PreferDualStack));
        assert_eq!(s.extra.secondary_cluster_ip, None);
        // Two cluster IPs without a policy: RequireDualStack, as the API server defaults it.
        let s = service(&svc(
            "{clusterIPs: ['fd00::10', 10.96.0.10], ports: [{port: 1}]}",
        ));
        assert_eq!(
            s.effective_ip_family_policy(),
            IpFamilyPolicy::RequireDualStack
        );
        assert_eq!(s.cluster_ip, ClusterIpSpec::Ip(ip("fd00::10")));
        let s = service(&svc("{ports: [{port: 1}]}"));
        assert_eq!(s.effective_ip_family_policy(), IpFamilyPolicy::SingleStack);

        assert_error(
            &svc("{ipFamilyPolicy: DualStack, ports: [{port: 1}]}"),
            "spec.ipFamilyPolicy",
            "must be SingleStack, PreferDualStack or RequireDualStack",
        );
        assert_error(
            &svc("{ipFamilies: [IPv4, IPv4], ports: [{port: 1}]}"),
            "spec.ipFamilies[1]",
            "listed twice",
        );
        assert_error(
            &svc("{ipFamilies: [IPv5], ports: [{port: 1}]}"),
            "spec.ipFamilies[0]",
            "must be IPv4 or IPv6",
        );
        assert_error(
            &svc(
                "{clusterIPs: [10.96.0.10, 'fd00::10'], ipFamilies: [IPv6, IPv4], \
                  ipFamilyPolicy: RequireDualStack, ports: [{port: 1}]}",
            ),
            "spec.clusterIPs[0]",
            "is not of spec.ipFamilies[0] (IPv6)",
        );
        assert_error(
            &svc("{clusterIPs: [10.96.0.10, 10.96.0.11], ports: [{port: 1}]}"),
            "spec.clusterIPs[1]",
            "other IP family",
        );
        assert_error(
            &svc("{ipFamilyPolicy: SingleStack, ipFamilies: [IPv4, IPv6], ports: [{port: 1}]}"),
            "spec.ipFamilies",
            "one family only",
        );
        assert_error(
            &svc(
                "{ipFamilyPolicy: SingleStack, clusterIPs: [10.96.0.10, 'fd00::10'], \
                  ports: [{port: 1}]}",
            ),
            "spec.clusterIPs",
            "one address only",
        );
    }

    #[test]
    fn affinity_source_ranges_and_health_check_port() {
        let s = service(&svc("{ports: [{port: 1}], sessionAffinity: ClientIP}"));
        assert_eq!(
            s.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 10800
            }
        );
        let s = service(&svc("{ports: [{port: 1}], sessionAffinity: ClientIP, \
             sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}}"));
        assert_eq!(s.session_affinity.timeout_seconds(), Some(2));
        let s = service(&svc("{ports: [{port: 1}], sessionAffinity: None}"));
        assert_eq!(s.session_affinity, SessionAffinity::None);

        let s = service(&svc(
            "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             ports: [{port: 1}], loadBalancerSourceRanges: [' 10.1.2.3/8 ', 'fd00::/8']}",
        ));
        let want: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert_eq!(s.extra.load_balancer_source_ranges, want);
        assert_eq!(s.extra.health_check_node_port, Some(32000));

        // The annotation, when the field is empty (kube-proxy's reading); the field wins.
        let annotated = |spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    \
                 service.beta.kubernetes.io/load-balancer-source-ranges: '10.0.0.0/8, 192.168.2.0/24'\n\
                 spec: {spec}\n"
            )
        };
        let s = service(&annotated("{type: LoadBalancer, ports: [{port: 1}]}"));
        let want: Vec<Cidr> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.2.0/24".parse().unwrap(),
        ];
        assert_eq!(s.extra.load_balancer_source_ranges, want);
        let s = service(&annotated(
            "{type: LoadBalancer, ports: [{port: 1}], loadBalancerSourceRanges: [1.2.3.0/24]}",
        ));
        let want: Vec<Cidr> = vec!["1.2.3.0/24".parse().unwrap()];
        assert_eq!(s.extra.load_balancer_source_ranges, want);
        let e = assert_error(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    \
              service.beta.kubernetes.io/load-balancer-source-ranges: '10.0.0.0/8,bogus'\n\
              spec: {type: LoadBalancer, ports: [{port: 1}]}\n",
            "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]",
            "got \"bogus\"",
        );
        assert_eq!(e.at.object.as_deref(), Some("Service default/web"));
    }

    #[test]
    fn headless_and_external_name() {
        let s = service(&svc("{clusterIP: None, selector: {app: db}}"));
        assert!(s.is_headless());
        assert!(s.ports.is_empty());
        let s = service(&svc(
            "{clusterIP: None, clusterIPs: [None], ports: [{port: 5432}]}",
        ));
        assert!(s.is_headless());

        let s = service(&svc("{type: ExternalName, externalName: db.example.com.}"));
        assert_eq!(s.type_, ServiceType::ExternalName);
        assert_eq!(s.extra.external_name.as_deref(), Some("db.example.com."));
        assert!(s.ports.is_empty());
        assert_eq!(s.cluster_ip, ClusterIpSpec::Auto);
    }

    #[test]
    fn metadata_is_read() {
        let s = service(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  \
             uid: 1f2e\n  resourceVersion: \"42\"\n  creationTimestamp: 2024-05-01T10:00:00Z\n  \
             labels: {app: web}\n  annotations: {note: ~, 'example.com/x': 'y'}\n\
             spec: {ports: [{port: 80}]}\n",
        );
        assert_eq!(
            s.meta,
            Meta {
                name: "web".into(),
                namespace: "shop".into(),
                labels: strings(&[("app", "web")]),
                extra: ferry_model::MetaExtra {
                    annotations: strings(&[("note", ""), ("example.com/x", "y")]),
                    creation_timestamp: Some("2024-05-01T10:00:00Z".into()),
                    uid: Some("1f2e".into()),
                    resource_version: Some("42".into()),
                }
                .into(),
            }
        );
    }

    #[test]
    fn service_errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("{ports: [{port: 70000}]}", "spec.ports[0].port", "must be between 1 and 65535, got 70000"),
            ("{ports: [{port: 0}]}", "spec.ports[0].port", "must be between 1 and 65535, got 0"),
            ("{ports: [{port: -1}]}", "spec.ports[0].port", "got -1"),
            ("{ports: [{port: 18446744073709551615}]}", "spec.ports[0].port", "got 18446744073709551615"),
            ("{ports: [{port: '80'}]}", "spec.ports[0].port", "must be an integer, got string \"80\""),
            ("{ports: [{port: 80.5}]}", "spec.ports[0].port", "must be an integer"),
            ("{ports: [{name: a}]}", "spec.ports[0].port", "required"),
            ("{ports: [{port: 80, protocol: HTTP}]}", "spec.ports[0].protocol", "must be TCP, UDP or SCTP, got \"HTTP\""),
            ("{ports: [{port: 80, protocol: tcp}]}", "spec.ports[0].protocol", "got \"tcp\""),
            ("{ports: [{port: 80, targetPort: 70000}]}", "spec.ports[0].targetPort", "must be between 0 and 65535"),
            ("{ports: [{port: 80, targetPort: '8080'}]}", "spec.ports[0].targetPort", "IANA service name"),
            ("{ports: [{port: 80, targetPort: Http}]}", "spec.ports[0].targetPort", "IANA service name"),
            ("{ports: [{port: 80, targetPort: a-very-long-port-name}]}", "spec.ports[0].targetPort", "IANA"),
            ("{ports: [{port: 80, targetPort: [1]}]}", "spec.ports[0].targetPort", "must be an integer, got a list"),
            ("{ports: [{port: 80, nodePort: 30080}]}", "spec.ports[0].nodePort", "may not be set when type is ClusterIP"),
            ("{type: NodePort, ports: [{port: 80, nodePort: 70000}]}", "spec.ports[0].nodePort", "got 70000"),
            ("{type: NodePort, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]}", "spec.ports[1].nodePort", "duplicate node port 30080/TCP"),
            ("{ports: [{port: 80}, {port: 81}]}", "spec.ports[1].name", "required when the Service has more than one port"),
            ("{ports: [{name: http, port: 80}, {name: http, port: 81}]}", "spec.ports[1].name", "duplicate port name \"http\" (also spec.ports[0])"),
            ("{ports: [{name: Http, port: 80}]}", "spec.ports[0].name", "DNS-1123 label"),
            ("{ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1]", "duplicate port 80/TCP (also spec.ports[0])"),
            ("{ports: [{name: a, port: 80, protocol: UDP}, {name: b, port: 80, protocol: UDP}]}", "spec.ports[1]", "duplicate port 80/UDP"),
            ("{ports: 80}", "spec.ports", "must be a list, got number 80"),
            ("{ports: [80]}", "spec.ports[0]", "must be a mapping, got number 80"),
            ("{ports: []}", "spec.ports", "at least one port"),
            ("{selector: {app: web}}", "spec.ports", "at least one port"),
            ("{type: NodePort}", "spec.ports", "at least one port"),
            ("{type: Foo, ports: [{port: 1}]}", "spec.type", "must be ClusterIP, NodePort, LoadBalancer or ExternalName, got \"Foo\""),
            ("{type: 1, ports: [{port: 1}]}", "spec.type", "must be a string, got number 1"),
            ("{clusterIP: foo, ports: [{port: 1}]}", "spec.clusterIP", "must be an IP address, \"None\" (headless) or empty, got \"foo\""),
            ("{clusterIP: none, ports: [{port: 1}]}", "spec.clusterIP", "got \"none\""),
            ("{clusterIP: 10.0.0.1, clusterIPs: [10.0.0.2], ports: [{port: 1}]}", "spec.clusterIPs[0]", "must be equal to spec.clusterIP (10.0.0.1)"),
            ("{clusterIP: 10.0.0.1, clusterIPs: [10.0.0.1, 10.0.0.2], ports: [{port: 1}]}", "spec.clusterIPs[1]", "other IP family"),
            ("{clusterIPs: [10.0.0.1, 'fd00::1', 10.0.0.2], ports: [{port: 1}]}", "spec.clusterIPs", "at most two"),
            ("{clusterIPs: [None, 10.0.0.1], ports: [{port: 1}]}", "spec.clusterIPs", "must be the only entry"),
            ("{clusterIPs: [''], ports: [{port: 1}]}", "spec.clusterIPs[0]", "must be an IP address"),
            ("{clusterIPs: bogus, ports: [{port: 1}]}", "spec.clusterIPs", "must be a list"),
            ("{type: NodePort, clusterIP: None, ports: [{port: 1}]}", "spec.clusterIP", "may not be \"None\" (headless) for type NodePort"),
            ("{type: LoadBalancer, clusterIP: None, ports: [{port: 1}]}", "spec.clusterIP", "for type LoadBalancer"),
            ("{type: ExternalName}", "spec.externalName", "required"),
            ("{type: ExternalName, externalName: ''}", "spec.externalName", "required"),
            ("{type: ExternalName, externalName: 'Not_A_Name'}", "spec.externalName", "DNS-1123 subdomain"),
            ("{type: ExternalName, externalName: a.com, clusterIP: 10.0.0.1}", "spec.clusterIP", "may not be set for type ExternalName"),
            ("{ports: [{port: 1}], externalIPs: [1.2.3.4, bogus]}", "spec.externalIPs[1]", "must be an IP address, got \"bogus\""),
            ("{ports: [{port: 1}], externalIPs: [5]}", "spec.externalIPs[0]", "must be a string"),
            ("{ports: [{port: 1}], externalIPs: [0.0.0.0]}", "spec.externalIPs[0]", "0.0.0.0 may not be unspecified"),
            ("{ports: [{port: 1}], externalIPs: [127.0.0.1]}", "spec.externalIPs[0]", "may not be in the loopback range"),
            ("{ports: [{port: 1}], externalIPs: [224.0.0.1]}", "spec.externalIPs[0]", "may not be a multicast address"),
            ("{ports: [{port: 1}], externalIPs: [255.255.255.255]}", "spec.externalIPs[0]", "may not be the broadcast address"),
            ("{ports: [{port: 1}], externalIPs: [169.254.1.1]}", "spec.externalIPs[0]", "link-local"),
            ("{ports: [{port: 1}], externalIPs: ['::1']}", "spec.externalIPs[0]", "loopback"),
            ("{ports: [{port: 1}], externalIPs: ['fe80::1']}", "spec.externalIPs[0]", "link-local"),
            ("{type: LoadBalancer, ports: [{port: 1}], loadBalancerIP: 1.2.3}", "spec.loadBalancerIP", "must be an IP address"),
            ("{ports: [{port: 1}], loadBalancerClass: example.com/lb}", "spec.loadBalancerClass", "only be set when type is LoadBalancer"),
            ("{ports: [{port: 1}], externalTrafficPolicy: Foo}", "spec.externalTrafficPolicy", "must be Cluster or Local, got \"Foo\""),
            ("{ports: [{port: 1}], internalTrafficPolicy: Global}", "spec.internalTrafficPolicy", "must be Cluster or Local"),
            ("{ports: [{port: 1}], selector: {app: web, version: 2}}", "spec.selector[version]", "must be a string, got number 2 (quote it)"),
            ("{ports: [{port: 1}], selector: [app]}", "spec.selector", "must be a mapping"),
            ("{ports: [{port: 1}], sessionAffinity: Sticky}", "spec.sessionAffinity", "must be None or ClientIP, got \"Sticky\""),
            ("{ports: [{port: 1}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "must be between 1 and 86400, got 0"),
            ("{ports: [{port: 1}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}}", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "got 86401"),
            ("{ports: [{port: 1}], sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}}", "spec.sessionAffinityConfig", "must not be set when sessionAffinity is None"),
            ("{type: LoadBalancer, ports: [{port: 1}], loadBalancerSourceRanges: [10.0.0.0/8, 192.168.2.0/33]}", "spec.loadBalancerSourceRanges[1]", "must be a CIDR such as 192.168.0.0/16 or fd00::/8, got \"192.168.2.0/33\""),
            ("{type: LoadBalancer, ports: [{port: 1}], loadBalancerSourceRanges: [10.0.0.1]}", "spec.loadBalancerSourceRanges[0]", "missing /length"),
            ("{type: NodePort, ports: [{port: 1}], loadBalancerSourceRanges: [10.0.0.0/8]}", "spec.loadBalancerSourceRanges", "may only be used when type is LoadBalancer"),
            ("{type: LoadBalancer, ports: [{port: 1}], healthCheckNodePort: 30000}", "spec.healthCheckNodePort", "externalTrafficPolicy is Local"),
            ("{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 1}], healthCheckNodePort: 70000}", "spec.healthCheckNodePort", "must be between 1 and 65535, got 70000"),
            ("[ports]", "spec", "must be a mapping, got a list"),
        ];
        for (spec, field, msg) in cases {
            let e = assert_error(&svc(spec), field, msg);
            assert_eq!(
                e.at.object.as_deref(),
                Some("Service default/web"),
                "{spec}"
            );
            assert_eq!(e.at.doc_index, 0);
        }
        // A non-string key becomes a string, as Kubernetes' YAML-to-JSON conversion does.
        let s = service(&svc("{ports: [{port: 1}], selector: {1: web}}"));
        assert_eq!(s.selector, strings(&[("1", "web")]));
    }

    #[test]
    fn service_metadata_and_status_errors() {
        let doc = |metadata: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {metadata}\nspec: {{ports: [{{port: 1}}]}}\n")
        };
        assert_error(&doc("{name: Web}"), "metadata.name", "DNS-1035 label");
        assert_error(
            &doc("{name: 1web}"),
            "metadata.name",
            "starting with a letter",
        );
        assert_error(&doc("{name: web-}"), "metadata.name", "DNS-1035");
        assert_error(
            &doc(&format!("{{name: {}}}", "a".repeat(64))),
            "metadata.name",
            "63",
        );
        assert_error(&doc("{name: a.b}"), "metadata.name", "DNS-1035");
        assert_error(&doc("{namespace: x}"), "metadata.name", "required");
        assert_error(&doc("{name: ''}"), "metadata.name", "required");
        assert_error(&doc("{name: 5}"), "metadata.name", "must be a string");
        assert_error(
            &doc("{name: web, namespace: Shop}"),
            "metadata.namespace",
            "DNS-1123 label",
        );
        assert_error(
            &doc("{name: web, labels: {a: true}}"),
            "metadata.labels[a]",
            "got boolean true",
        );
        assert_error(
            &doc("{name: web, annotations: {a: [1]}}"),
            "metadata.annotations[a]",
            "got a list",
        );
        assert_error(
            &doc("{name: web, uid: 5}"),
            "metadata.uid",
            "must be a string",
        );
        assert_error(&doc("[]"), "metadata", "must be a mapping");
        assert_error(
            "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 1}]}\n",
            "metadata",
            "required",
        );
        assert_error(
            &format!(
                "{}status: {{loadBalancer: {{ingress: [{{ip: 999.1.1.1}}]}}}}\n",
                svc("{ports: [{port: 1}]}")
            ),
            "status.loadBalancer.ingress[0].ip",
            "must be an IP address",
        );
    }

    #[test]
    fn proxy_mode_ingress_is_not_forwarded() {
        let p = parse(&format!(
            "{}status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.7, ipMode: Proxy}}, {{ip: 192.0.2.8, ipMode: VIP}}, {{ip: 192.0.2.9}}]}}}}\n",
            svc("{ports: [{port: 1}]}")
        ));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let Object::Service(s) = &p.objects[0] else {
            panic!("{:?}", p.objects)
        };
        let want: Vec<std::net::IpAddr> =
            vec!["192.0.2.8".parse().unwrap(), "192.0.2.9".parse().unwrap()];
        assert_eq!(s.extra.load_balancer_ingress, want);
    }

    #[test]
    fn objects_from_the_api_are_named_without_a_file() {
        let raw = RawObject {
            file: String::new(),
            doc_index: 0,
            base: String::new(),
            kind: "Service".into(),
            api_version: "v1".into(),
            value: serde_json::json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": [{"port": 0}]}}),
        };
        let p = parse_object(&raw);
        assert_eq!(
            p.errors[0].to_string(),
            "Service shop/web field spec.ports[0].port: must be between 1 and 65535, got 0 (required: missing or 0)"
        );
    }

    #[test]
    fn several_errors_in_one_object() {
        let p = parse(&svc("{type: Foo, ports: [{port: 0}, {port: 70000}]}"));
        assert!(p.objects.is_empty());
        let fields: Vec<_> = p.errors.iter().map(|e| e.at.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.type",
                "spec.ports[0].name",
                "spec.ports[0].port",
                "spec.ports[1].name",
                "spec.ports[1].port"
            ]
        );
    }

    #[test]
    fn yaml_features() {
        // Anchors, aliases, merge keys, tags and null fields.
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: &l {app: web}\n\
                    spec:\n  selector: *l\n  type: !!str NodePort\n  clusterIP: null\n  ports:\n  \
                    - &p {name: a, port: 80, protocol: TCP}\n  - <<: *p\n    name: b\n    protocol: UDP\n";
        let s = service(text);
        assert_eq!(s.selector, strings(&[("app", "web")]));
        assert_eq!(s.type_, ServiceType::NodePort);
        assert_eq!(s.ports.len(), 2);
        assert_eq!((s.ports[1].port, s.ports[1].protocol), (80, Protocol::Udp));
        assert_error("apiVersion: v1\nkind: Service\n<<: 5\n", "", "merge");
        assert_error("a: 1\na: 2\n", "", "duplicate");
    }

    #[test]
    fn hostile_yaml_does_not_blow_up() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse(&deep).errors.len(), 1);
        let deep_map = "a:\n".to_string()
            + &(1..300)
                .map(|i| format!("{}a:\n", " ".repeat(i)))
                .collect::<String>();
        assert_eq!(parse(&deep_map).errors.len(), 1);
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("a{}", i - 1)
            };
            laughs += &format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n");
        }
        assert_eq!(parse(&laughs).errors.len(), 1);
    }

    // ---- EndpointSlice / Endpoints --------------------------------------------------------

    const SLICE: &str = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
  nodeName: node-1
  hostname: web-0
  targetRef: {kind: Pod, name: web-0, namespace: shop}
- addresses: ["10.244.2.6"]
- addresses: ["10.244.2.7"]
  conditions: {terminating: true, serving: true}
- addresses: ["10.244.2.8"]
  conditions: {ready: false}
ports:
- name: http
  port: 8080
- name: all
  port: null
  protocol: UDP
- port: 9090
  protocol: SCTP
"#;

    #[test]
    fn endpoint_slice() {
        let p = parse(SLICE);
        assert!(p.errors.is_empty(), "{p:#?}");
        assert_eq!(p.warnings.len(), 1, "{p:#?}");
        assert_eq!(p.warnings[0].at.field, "ports[1].port");
        assert!(p.warnings[0].message.contains("all ports"));
        let Object::EndpointSlice(s) = &p.objects[0] else {
            panic!("{p:#?}")
        };
        assert_eq!(s.service_name, "web");
        assert_eq!(s.meta.object_ref().to_string(), "shop/web-abc12");
        assert_eq!(s.address_type, AddressType::IPv4);
        let c = |ready, serving, terminating| EndpointConditions {
            ready,
            serving,
            terminating,
        };
        assert_eq!(
            s.endpoints[0],
            Endpoint {
                addresses: vec![ip("10.244.1.5")].into(),
                conditions: c(true, true, false),
                node_name: Some("node-1".into()),
                zone_hints: None,
            }
        );
        assert_eq!(s.endpoints[1].conditions, c(true, true, false));
        assert_eq!(s.endpoints[1].node_name, None);
        assert_eq!(s.endpoints[2].conditions, c(false, true, true));
        assert_eq!(s.endpoints[3].conditions, c(false, false, false));
        assert_eq!(
            s.ports,
            vec![
                EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                EndpointPort {
                    name: String::new(),
                    protocol: Protocol::Sctp,
                    port: 9090
                },
            ]
        );
    }

    #[test]
    fn endpoint_slice_ipv6_and_fqdn() {
        let v6 = SLICE
            .replace("IPv4", "IPv6")
            .replace("10.244.1.5", "fd00::1:5")
            .replace("10.244.2.", "fd00::2:");
        let p = parse(&v6);
        assert!(p.errors.is_empty(), "{p:#?}");
        let Object::EndpointSlice(s) = &p.objects[0] else {
            panic!()
        };
        assert_eq!(s.address_type, AddressType::IPv6);
        assert_eq!(s.endpoints[0].addresses.as_slice(), [ip("fd00::1:5")]);

        let fqdn =
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext\n  \
                    labels: {kubernetes.io/service-name: ext}\naddressType: FQDN\n\
                    endpoints: [{addresses: [db.example.com]}]\nports: [{port: 5432}]\n";
        let p = parse(fqdn);
        assert!(p.errors.is_empty(), "{p:#?}");
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].at.field, "addressType");
        let Object::EndpointSlice(s) = &p.objects[0] else {
            panic!()
        };
        assert_eq!(s.address_type, AddressType::Fqdn);
        assert!(s.endpoints[0].addresses.is_empty());
        assert_error(
            &fqdn.replace("db.example.com", "Not_A_Host"),
            "endpoints[0].addresses[0]",
            "DNS-1123 subdomain",
        );
    }

    #[test]
    fn endpoint_slice_errors() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "    kubernetes.io/service-name: web\n",
                "    other: x\n",
                "metadata.labels",
                "kubernetes.io/service-name",
            ),
            (
                "addressType: IPv4",
                "addressType: IPv5",
                "addressType",
                "must be IPv4, IPv6 or FQDN, got \"IPv5\"",
            ),
            ("addressType: IPv4\n", "", "addressType", "required"),
            (
                "\"10.244.2.6\"",
                "\"fd00::6\"",
                "endpoints[1].addresses[0]",
                "must be an IPv4 address",
            ),
            (
                "\"10.244.2.6\"",
                "\"10.244.2.600\"",
                "endpoints[1].addresses[0]",
                "IPv4 address",
            ),
            (
                "- addresses: [\"10.244.2.6\"]",
                "- addresses: []",
                "endpoints[1].addresses",
                "at least one address",
            ),
            (
                "{ready: true}",
                "{ready: \"yes\"}",
                "endpoints[0].conditions.ready",
                "must be true or false, got string \"yes\"",
            ),
            (
                "{ready: false}",
                "{ready: false, terminating: 1}",
                "endpoints[3].conditions.terminating",
                "must be true or false",
            ),
            (
                "nodeName: node-1",
                "nodeName: [node-1]",
                "endpoints[0].nodeName",
                "must be a string",
            ),
            (
                "port: 8080",
                "port: 0",
                "ports[0].port",
                "must be between 1 and 65535, got 0",
            ),
            ("port: 9090", "port: 65536", "ports[2].port", "got 65536"),
            (
                "protocol: SCTP",
                "protocol: ICMP",
                "ports[2].protocol",
                "got \"ICMP\"",
            ),
            (
                "- port: 9090",
                "- name: http\n  port: 9090",
                "ports[2].name",
                "duplicate port name \"http\"",
            ),
            (
                "- name: http",
                "- name: HTTP",
                "ports[0].name",
                "DNS-1123 label",
            ),
        ];
        for (from, to, field, msg) in cases {
            let text = SLICE.replacen(from, to, 1);
            assert_ne!(text, SLICE, "{from}");
            let e = assert_error(&text, field, msg);
            assert_eq!(e.at.object.as_deref(), Some("EndpointSlice shop/web-abc12"));
        }
    }

    const ENDPOINTS: &str = r#"apiVersion: v1
kind: Endpoints
metadata:
  name: db
  namespace: shop
  uid: 0c1d
  labels: {team: data}
subsets:
- addresses:
  - ip: 10.244.1.5
    nodeName: node-1
    hostname: db-0
    targetRef: {kind: Pod, name: db-0}
  notReadyAddresses:
  - ip: 10.244.2.6
  ports:
  - {name: pg, port: 5432}
- addresses:
  - ip: 10.244.3.7
  - ip: fd00::7
  ports:
  - {name: metrics, port: 9187, protocol: UDP}
- ports:
  - {port: 1}
"#;

    #[test]
    fn endpoints_become_slices() {
        let p = parse(ENDPOINTS);
        assert!(p.errors.is_empty() && p.warnings.is_empty(), "{p:#?}");
        let slices: Vec<&EndpointSlice> = p
            .objects
            .iter()
            .map(|o| match o {
                Object::EndpointSlice(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        let names: Vec<_> = slices.iter().map(|s| s.meta.name.as_str()).collect();
        assert_eq!(names, ["db-0", "db-1-ipv4", "db-1-ipv6"]);
        for s in &slices {
            assert_eq!(s.service_name, "db");
            assert_eq!(s.meta.namespace, "shop");
            assert_eq!(s.meta.extra.uid, None);
            assert_eq!(
                s.meta.labels,
                strings(&[("team", "data"), ("kubernetes.io/service-name", "db")])
            );
        }
        let ready = EndpointConditions {
            ready: true,
            serving: true,
            terminating: false,
        };
        assert_eq!(slices[0].address_type, AddressType::IPv4);
        assert_eq!(
            slices[0].endpoints,
            vec![
                Endpoint {
                    addresses: vec![ip("10.244.1.5")].into(),
                    conditions: ready,
                    node_name: Some("node-1".into()),
                    zone_hints: None,
                },
                Endpoint {
                    addresses: vec![ip("10.244.2.6")].into(),
                    conditions: EndpointConditions {
                        ready: false,
                        serving: false,
                        terminating: false,
                    },
                    node_name: None,
                    zone_hints: None,
                },
            ]
        );
        assert_eq!(
            slices[0].ports,
            vec![EndpointPort {
                name: "pg".into(),
                protocol: Protocol::Tcp,
                port: 5432
            }]
        );
        assert_eq!(slices[1].endpoints.len(), 1);
        assert_eq!(slices[2].address_type, AddressType::IPv6);
        assert_eq!(slices[2].endpoints[0].addresses.as_slice(), [ip("fd00::7")]);
        assert_eq!(slices[1].ports, slices[2].ports);
        assert_eq!(slices[2].ports[0].protocol, Protocol::Udp);

        // Endpoints without subsets: nothing, quietly.
        let p = parse("apiVersion: v1\nkind: Endpoints\nmetadata: {name: x}\n");
        assert_eq!(p, Parsed::default());
    }

    #[test]
    fn endpoints_errors() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "ip: 10.244.1.5",
                "ip: 10.244.1",
                "subsets[0].addresses[0].ip",
                "must be an IP address",
            ),
            (
                "  - ip: 10.244.2.6",
                "  - hostname: x",
                "subsets[0].notReadyAddresses[0].ip",
                "required",
            ),
            (
                "{name: pg, port: 5432}",
                "{name: pg}",
                "subsets[0].ports[0].port",
                "required",
            ),
            (
                "{port: 1}",
                "{port: 100000}",
                "subsets[2].ports[0].port",
                "got 100000",
            ),
            (
                "{port: 1}",
                "{port: 1, protocol: ANY}",
                "subsets[2].ports[0].protocol",
                "got \"ANY\"",
            ),
            (
                "- ports:\n  - {port: 1}",
                "- 5",
                "subsets[2]",
                "must be a mapping",
            ),
        ];
        for (from, to, field, msg) in cases {
            let text = ENDPOINTS.replacen(from, to, 1);
            assert_ne!(text, ENDPOINTS, "{from}");
            let e = assert_error(&text, field, msg);
            assert_eq!(e.at.object.as_deref(), Some("Endpoints shop/db"));
        }
    }

    // ---- Node, ConfigMap --------------------------------------------------------------------

    #[test]
    fn node() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1.lab\n  namespace: ignored\n  \
                    labels: {kubernetes.io/hostname: node-1}\nspec:\n  podCIDR: 10.244.1.0/24\n  \
                    podCIDRs: [10.244.1.0/24, 'fd00:244:1::/64']\nstatus:\n  addresses:\n  \
                    - {type: InternalIP, address: 192.168.2.11}\n  - {type: Hostname, address: node-1}\n";
        let Object::Node(n) = one(text) else { panic!() };
        assert_eq!(n.meta.name, "node-1.lab");
        assert_eq!(n.meta.namespace, "");
        assert_eq!(n.pod_cidrs, ["10.244.1.0/24", "fd00:244:1::/64"]);
        assert_eq!(n.internal_ips(), vec![ip("192.168.2.11")]);
        assert_eq!(n.addresses.len(), 2);

        let Object::Node(n) =
            one("apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.0.0/24}\n")
        else {
            panic!()
        };
        assert_eq!(n.pod_cidrs, ["10.0.0.0/24"]);
        assert!(n.addresses.is_empty());

        let base = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n";
        let e = assert_error(
            &format!("{base}spec: {{podCIDR: 10.0.0.0/33}}\n"),
            "spec.podCIDR",
            "must be a CIDR",
        );
        assert_eq!(e.at.object.as_deref(), Some("Node n"));
        assert_error(
            &format!("{base}spec: {{podCIDRs: [x]}}\n"),
            "spec.podCIDRs[0]",
            "must be a CIDR",
        );
        assert_error(
            &format!("{base}spec: {{podCIDR: 10.0.0.0/24, podCIDRs: [10.0.1.0/24]}}\n"),
            "spec.podCIDRs[0]",
            "must be equal to spec.podCIDR",
        );
        assert_error(
            &format!("{base}status: {{addresses: [{{address: 1.2.3.4}}]}}\n"),
            "status.addresses[0].type",
            "required",
        );
        assert_error(
            &format!("{base}status: {{addresses: [{{type: InternalIP}}]}}\n"),
            "status.addresses[0].address",
            "required",
        );
        assert_error(
            "apiVersion: v1\nkind: Node\nmetadata: {name: Node_1}\n",
            "metadata.name",
            "DNS-1123 subdomain",
        );
    }

    // ---- Namespace, MetalLB ---------------------------------------------------------------

    #[test]
    fn namespace() {
        let Object::Namespace(n) =
            one("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: web}}\n")
        else {
            panic!()
        };
        assert_eq!(n.meta.name, "shop");
        assert_eq!(n.meta.namespace, "");
        assert_eq!(n.meta.labels, strings(&[("team", "web")]));
        let e = assert_error(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n",
            "metadata.name",
            "DNS-1123 label",
        );
        assert_eq!(e.at.object.as_deref(), Some("Namespace a.b"));
    }

    /// The seed's legacy ConfigMap is read unchanged, then by pools::load.
    #[test]
    fn seed_configmap_makes_a_pool() {
        let Object::ConfigMap(c) = one(CONFIGMAP_SEED) else {
            panic!()
        };
        let (cfg, errs) = ferry_model::pools::load(&[c], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(cfg.pools[0].name, "default");
        assert_eq!(cfg.pools[0].addresses().next(), Some(ip("192.168.2.200")));
    }

    const POOL: &str = r#"apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan
  namespace: metallb-system
  labels: {site: home}
spec:
  addresses:
  - 192.168.2.200-192.168.2.225
  - fd00:2::/120
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 10
    namespaces: [shop]
    namespaceSelectors:
    - matchLabels: {team: web}
    serviceSelectors:
    - matchExpressions:
      - {key: expose, operator: In, values: [public, both]}
      - {key: legacy, operator: DoesNotExist}
"#;

    #[test]
    fn ip_address_pool() {
        let Object::IpAddressPool(p) = one(POOL) else {
            panic!()
        };
        assert_eq!(p.meta.object_ref().to_string(), "metallb-system/lan");
        assert_eq!(p.meta.labels, strings(&[("site", "home")]));
        assert_eq!(p.addresses, ["192.168.2.200-192.168.2.225", "fd00:2::/120"]);
        assert!(!p.auto_assign && p.avoid_buggy_ips);
        let sa = p.service_allocation.unwrap();
        assert_eq!(sa.priority, Some(10));
        assert_eq!(sa.namespaces, ["shop"]);
        assert_eq!(
            sa.namespace_selectors[0].match_labels,
            strings(&[("team", "web")])
        );
        let exprs = &sa.service_selectors[0].match_expressions;
        assert_eq!(exprs.len(), 2);
        assert_eq!(exprs[0].operator, SelectorOperator::In);
        assert_eq!(exprs[0].values, ["public", "both"]);
        assert_eq!(exprs[1].operator, SelectorOperator::DoesNotExist);
        assert!(sa.service_selectors[0].matches(&strings(&[("expose", "both")])));

        // Defaults; a typed list.
        let text = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPoolList\nitems:\n\
                    - metadata: {name: a, namespace: metallb-system}\n  \
                    spec: {addresses: [10.0.0.0/24]}\n";
        let p = parse(text);
        assert!(p.errors.is_empty(), "{p:#?}");
        let Object::IpAddressPool(a) = &p.objects[0] else {
            panic!()
        };
        assert!(a.auto_assign && !a.avoid_buggy_ips && a.service_allocation.is_none());
        // The CRD equivalent of the seed ConfigMap gives the same first address.
        let (cfg, errs) = ferry_model::pools::load(&[], std::slice::from_ref(a), &[]);
        assert!(errs.is_empty());
        assert_eq!(cfg.pools[0].addresses().next(), Some(ip("10.0.0.0")));
    }

    #[test]
    fn ip_address_pool_errors_name_the_field() {
        let base = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\n\
                    metadata: {name: lan, namespace: metallb-system}\n";
        let e = assert_error(
            &format!("{base}spec: {{addresses: [192.168.2.0/28, 192.168.2.300-192.168.2.310]}}\n"),
            "spec.addresses[1]",
            "\"192.168.2.300-192.168.2.310\" is not an IP range",
        );
        assert_eq!(
            e.at.object.as_deref(),
            Some("IPAddressPool metallb-system/lan")
        );
        assert_error(
            &format!("{base}spec: {{addresses: []}}\n"),
            "spec.addresses",
            "required",
        );
        assert_error(&format!("{base}spec: {{}}\n"), "spec.addresses", "required");
        assert_error(base, "spec", "required");
        assert_error(
            &format!("{base}spec: {{addresses: [10.0.0.1]}}\n"),
            "spec.addresses[0]",
            "write 10.0.0.1/32",
        );
        assert_error(
            &format!("{base}spec: {{addresses: [10.0.0.0/8], autoAssign: 'no'}}\n"),
            "spec.autoAssign",
            "must be true or false",
        );
        assert_error(
            &format!(
                "{base}spec: {{addresses: [10.0.0.0/8], serviceAllocation: {{priority: -1}}}}\n"
            ),
            "spec.serviceAllocation.priority",
            "between 0 and",
        );
        assert_error(
            &format!("{base}spec: {{addresses: [10.0.0.0/8], serviceAllocation: {{namespaces: [Shop]}}}}\n"),
            "spec.serviceAllocation.namespaces[0]",
            "DNS-1123 label",
        );
        let sel = |s: &str| {
            format!("{base}spec: {{addresses: [10.0.0.0/8], serviceAllocation: {{serviceSelectors: [{s}]}}}}\n")
        };
        assert_error(
            &sel("{matchExpressions: [{key: a, operator: Like, values: [x]}]}"),
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].operator",
            "must be In, NotIn, Exists or DoesNotExist, got \"Like\"",
        );
        assert_error(
            &sel("{matchExpressions: [{key: a, operator: In}]}"),
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].values",
            "required",
        );
        assert_error(
            &sel("{matchExpressions: [{key: a, operator: Exists, values: [x]}]}"),
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].values",
            "must be empty",
        );
        assert_error(
            &sel("{matchExpressions: [{operator: Exists}]}"),
            "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].key",
            "required",
        );
        assert_error(
            &sel("{matchLabels: {a: 1}}"),
            "spec.serviceAllocation.serviceSelectors[0].matchLabels[a]",
            "must be a string",
        );
        assert_error(
            &sel("x"),
            "spec.serviceAllocation.serviceSelectors[0]",
            "must be a mapping",
        );
        assert_error(
            "apiVersion: metallb.io/v1beta2\nkind: IPAddressPool\nmetadata: {name: x}\n",
            "apiVersion",
            "needs apiVersion metallb.io/v1beta1",
        );
    }

    #[test]
    fn l2_advertisement() {
        let text = "apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\n\
                    metadata: {name: l2, namespace: metallb-system}\n\
                    spec:\n  ipAddressPools: [lan]\n  \
                    ipAddressPoolSelectors: [{matchLabels: {site: home}}]\n  \
                    nodeSelectors: [{matchExpressions: [{key: role, operator: NotIn, values: [db]}]}]\n  \
                    interfaces: [eth0]\n";
        let Object::L2Advertisement(a) = one(text) else {
            panic!()
        };
        assert_eq!(a.ip_address_pools, ["lan"]);
        assert_eq!(
            a.ip_address_pool_selectors[0].match_labels,
            strings(&[("site", "home")])
        );
        assert_eq!(
            a.node_selectors[0].match_expressions[0].operator,
            SelectorOperator::NotIn
        );
        assert_eq!(a.interfaces, ["eth0"]);
        // The seed form: no spec at all (every pool, every node).
        let Object::L2Advertisement(a) =
            one("apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\n\
             metadata: {name: l2, namespace: metallb-system}\n")
        else {
            panic!()
        };
        assert!(a.ip_address_pools.is_empty() && a.node_selectors.is_empty());
        assert_error(
            "apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: l2}\n\
             spec: {interfaces: eth0}\n",
            "spec.interfaces",
            "must be a list",
        );
        assert_error(
            "apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: l2}\n\
             spec: {ipAddressPools: [1]}\n",
            "spec.ipAddressPools[0]",
            "must be a string",
        );
    }

    /// MetalLB's BGP kinds, as its docs show them, read and then loaded by the model.
    const BGP_MANIFEST: &str = "\
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: bgp-pool, namespace: metallb-system, labels: {announce: bgp}}
spec: {addresses: [198.51.100.0/24]}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: tor, namespace: metallb-system}
spec:
  myASN: 64500
  peerASN: 64501
  peerAddress: 10.0.0.1
  holdTime: 9s
  keepaliveTime: 3s
  routerID: 10.0.0.100
  nodeSelectors: [{matchLabels: {rack: a}}]
  passwordSecret: {name: tor-md5, namespace: metallb-system}
  bfdProfile: fast
---
apiVersion: metallb.io/v1beta1
kind: BGPPeer
metadata: {name: old, namespace: metallb-system}
spec: {myASN: 64500, peerASN: 64502, peerAddress: 'fd00::1', ebgpMultiHop: true}
---
apiVersion: v1
kind: Secret
metadata: {name: tor-md5, namespace: metallb-system}
type: kubernetes.io/basic-auth
stringData: {password: hunter2}
---
apiVersion: metallb.io/v1beta1
kind: BFDProfile
metadata: {name: fast, namespace: metallb-system}
spec: {receiveInterval: 100, transmitInterval: 100, detectMultiplier: 3}
---
apiVersion: metallb.io/v1beta1
kind: Community
metadata: {name: communities, namespace: metallb-system}
spec:
  communities:
  - {name: no-advertise, value: '65535:65282'}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: local, namespace: metallb-system}
spec:
  ipAddressPoolSelectors: [{matchLabels: {announce: bgp}}]
  aggregationLength: 32
  localPref: 100
  communities: [no-advertise, 'large:64500:1:1']
  peers: [tor]
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: external, namespace: metallb-system}
spec:
  ipAddressPools: [bgp-pool]
  aggregationLength: 24
";

    #[test]
    fn bgp_kinds() {
        let p = parse(BGP_MANIFEST);
        assert!(p.errors.is_empty() && p.warnings.is_empty(), "{p:#?}");
        let mut snap = crate::Snapshot::default();
        for o in p.objects {
            match o {
                Object::IpAddressPool(x) => snap.ip_pools.push(x),
                Object::BgpPeer(x) => snap.bgp_peers.push(*x),
                Object::BgpAdvertisement(x) => snap.bgp_advertisements.push(x),
                Object::Community(x) => snap.communities.push(x),
                Object::BfdProfile(x) => snap.bfd_profiles.push(x),
                Object::Secret(x) => snap.secrets.push(x),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(snap.bgp_peers.len(), 2, "both versions");
        assert_eq!(snap.bgp_peers[0].hold_time.as_deref(), Some("9s"));
        assert_eq!(snap.secrets[0].type_, "kubernetes.io/basic-auth");
        let (pools, errs) = ferry_model::pools::load(&[], &snap.ip_pools, &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let (cfg, errs) = ferry_model::bgp::load(&pools, &snap.bgp_inputs());
        assert!(errs.is_empty(), "{errs:#?}");
        let tor = cfg.peer("tor").unwrap();
        assert_eq!(tor.hold_time.as_secs(), 9);
        assert_eq!(tor.keepalive_time.as_secs(), 3);
        assert_eq!(tor.password.as_ref().map(|p| p.0.as_str()), Some("hunter2"));
        assert_eq!(tor.bfd_profile.as_deref(), Some("fast"));
        assert_eq!(cfg.bfd_profile("fast").unwrap().receive_interval_ms, 100);
        let old = cfg.peer("old").unwrap();
        assert!(old.ebgp_multihop && old.peer_address.is_ipv6());
        // A node in rack a peers with both; its address goes to tor as a host route with the
        // communities, and to both as a /24.
        let node: BTreeMap<String, String> = strings(&[("rack", "a")]);
        let routes = cfg.announcements(
            &node,
            &[ferry_model::bgp::LbAddress {
                ip: "198.51.100.7".parse().unwrap(),
                pool: "bgp-pool".into(),
                eligible: true,
            }],
        );
        let shown: Vec<(String, Vec<String>)> = routes
            .iter()
            .map(|p| {
                (
                    p.peer.clone(),
                    p.routes.iter().map(|r| r.prefix.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("old".to_string(), vec!["198.51.100.0/24".to_string()]),
                (
                    "tor".to_string(),
                    vec!["198.51.100.0/24".to_string(), "198.51.100.7/32".to_string()]
                ),
            ]
        );
        let host = &routes[1].routes[1];
        assert_eq!(host.local_pref, Some(100));
        assert_eq!(host.communities, [0xffff_ff02]);
        assert_eq!(host.large_communities, [[64500, 1, 1]]);
        // Not in rack a: no session with tor.
        let other = cfg.announcements(&BTreeMap::new(), &[]);
        assert_eq!(other.len(), 1);
    }

    #[test]
    fn bgp_kind_errors() {
        let peer = "apiVersion: metallb.io/v1beta2\nkind: BGPPeer\n\
                    metadata: {name: p, namespace: metallb-system}\n";
        assert_error(
            &format!("{peer}spec: {{myASN: many}}\n"),
            "spec.myASN",
            "must be an integer",
        );
        assert_error(
            &format!("{peer}spec: {{myASN: -1}}\n"),
            "spec.myASN",
            "must not be negative, got -1",
        );
        assert_error(
            &format!("{peer}spec: {{interface: eth0}}\n"),
            "spec.interface",
            "not supported by ferry",
        );
        assert_error(
            &format!("{peer}spec: {{holdTime: 90}}\n"),
            "spec.holdTime",
            "must be a string",
        );
        let p = parse(&format!(
            "{peer}spec: {{myASN: 1, peerASN: 2, peerAddress: 10.0.0.1, connectTime: 5s}}\n"
        ));
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.warnings[0].at.field, "spec.connectTime");
        assert_error(
            "apiVersion: metallb.io/v1beta3\nkind: BGPPeer\nmetadata: {name: p}\n",
            "apiVersion",
            "needs apiVersion metallb.io/v1beta2",
        );
        assert_error(
            "apiVersion: metallb.io/v1beta1\nkind: BGPAdvertisement\nmetadata: {name: a}\n\
             spec: {serviceSelectors: [{matchLabels: {a: b}}]}\n",
            "spec.serviceSelectors",
            "not supported",
        );
        assert_error(
            "apiVersion: metallb.io/v1beta1\nkind: BGPAdvertisement\nmetadata: {name: a}\n\
             spec: {nodeSelectors: [{matchExpressions: [{key: a, operator: Near}]}]}\n",
            "spec.nodeSelectors[0].matchExpressions[0].operator",
            "",
        );
        assert_error(
            "apiVersion: metallb.io/v1beta1\nkind: BFDProfile\nmetadata: {name: b}\n\
             spec: {echoMode: maybe}\n",
            "spec.echoMode",
            "must be true or false",
        );
        // Lists of the older BGPPeer version read too.
        let p = parse(
            "apiVersion: metallb.io/v1beta1\nkind: BGPPeerList\nitems:\n\
             - metadata: {name: a}\n  spec: {myASN: 1, peerASN: 2, peerAddress: 10.0.0.1}\n",
        );
        assert!(p.errors.is_empty(), "{p:#?}");
        assert!(matches!(p.objects[..], [Object::BgpPeer(_)]));
    }

    #[test]
    fn config_map_errors() {
        let base = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n";
        let e = assert_error(
            &format!("{base}data: {{replicas: 3}}\n"),
            "data[replicas]",
            "must be a string, got number 3",
        );
        assert_eq!(e.at.object.as_deref(), Some("ConfigMap default/cfg"));
        assert_error(
            &format!("{base}data: {{app.properties: {{a: b}}}}\n"),
            "data[app.properties]",
            "got a mapping",
        );
        assert_error(
            &format!("{base}data: {{on: true}}\n"),
            "data[on]",
            "got boolean true",
        );
        assert_error(
            &format!("{base}data: {{'a b': x}}\n"),
            "data[a b]",
            "letters, digits",
        );
        assert_error(&format!("{base}data: [a]\n"), "data", "must be a mapping");
        let Object::ConfigMap(c) = one(&format!(
            "{base}data: {{empty: , k: '1'}}\nbinaryData: {{b: AAAA}}\n"
        )) else {
            panic!()
        };
        assert_eq!(c.data, strings(&[("empty", ""), ("k", "1")]));
    }

    #[test]
    fn line_number_shifting() {
        assert_eq!(
            shift_line_numbers(
                "bad at line 2 column 3, while parsing at line 1 column 1",
                10
            ),
            "bad at line 12 column 3, while parsing at line 11 column 1"
        );
        assert_eq!(
            shift_line_numbers("deadline 5 line x line 7", 3),
            "deadline 5 line x line 7"
        );
        assert_eq!(shift_line_numbers("line 2 column 1", 0), "line 2 column 1");
    }

    // ---- never panic ----------------------------------------------------------------------

    const MUTATION_ALPHABET: &[char] = &[
        ' ', ' ', '\n', '\t', ':', '-', '[', ']', '{', '}', '"', '\'', '#', '&', '*', '!', '|',
        '>', '0', '9', 'a', 'N', '.', ',', '%', '@', '`', '?', '~', '<', '\\', 'é',
    ];

    fn sample_manifest() -> String {
        [
            DEPLOYMENT_SEED,
            SERVICE_SEED,
            "---\n",
            LOADBALANCER_SEED,
            "---\n",
            SLICE,
            "---\n",
            ENDPOINTS,
            "---\n",
            CONFIGMAP_SEED,
        ]
        .concat()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_on_arbitrary_text(text in ".{0,400}") {
            let p = parse_text("p", &text);
            prop_assert!(p.errors.iter().chain(&p.warnings).all(|e| e.at.file == "p"));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            parse_text("p", &String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn never_panics_on_yamlish_text(
            chars in prop::collection::vec(prop::sample::select(MUTATION_ALPHABET), 0..300)
        ) {
            let text: String = chars.into_iter().collect();
            parse_text("p", &text);
            parse_text("p", &format!("apiVersion: v1\nkind: Service\n{text}"));
        }

        #[test]
        fn never_panics_on_char_mutations(
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0u8..3, prop::sample::select(MUTATION_ALPHABET)),
                1..10,
            )
        ) {
            let mut text: Vec<char> = sample_manifest().chars().collect();
            for (at, op, c) in edits {
                let i = at.index(text.len() + 1);
                match op {
                    0 => text.insert(i, c),
                    1 if i < text.len() => { text.remove(i); }
                    _ if i < text.len() => text[i] = c,
                    _ => text.push(c),
                }
            }
            let text: String = text.into_iter().collect();
            let p = parse_text("p", &text);
            // Every complaint points into the text: this file, a document that exists.
            let docs = documents(&text).len();
            for at in p.errors.iter().map(|e| &e.at).chain(p.warnings.iter().map(|w| &w.at)) {
                prop_assert_eq!(&at.file, "p");
                prop_assert!(at.doc_index < docs, "{at} of {docs} documents");
            }
        }

        #[test]
        fn never_panics_on_line_mutations(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 0u8..4), 1..6)
        ) {
            let sample = sample_manifest();
            let mut lines: Vec<String> = sample.lines().map(str::to_string).collect();
            for (a, b, op) in edits {
                let i = a.index(lines.len());
                let j = b.index(lines.len());
                match op {
                    0 => { lines.remove(i); }
                    1 => { let l = lines[i].clone(); lines.insert(j, l); }
                    2 => lines.swap(i, j),
                    _ => lines[i] = format!("  {}", lines[i]),
                }
                if lines.is_empty() {
                    lines.push(String::new());
                }
            }
            let text = lines.join("\n");
            let p = parse_text("p", &text);
            prop_assert!(p.objects.len() <= 12);
        }

        #[test]
        fn port_numbers(port in any::<i64>()) {
            let p = parse_text("p", &svc(&format!("{{ports: [{{port: {port}}}]}}")));
            if (1..=65535).contains(&port) {
                prop_assert!(p.errors.is_empty());
                let Object::Service(s) = &p.objects[0] else { panic!() };
                prop_assert_eq!(i64::from(s.ports[0].port), port);
            } else {
                prop_assert!(p.objects.is_empty());
                prop_assert_eq!(p.errors.len(), 1);
                prop_assert_eq!(&p.errors[0].at.field, "spec.ports[0].port");
                // 0 is also what a missing port decodes to: the message says so after this.
                prop_assert!(p.errors[0].message.starts_with(&format!("must be between 1 and 65535, got {port}")), "{}", p.errors[0].message);
            }
        }

        #[test]
        fn documents_are_independent(bad in "[a-z:{}\\[\\] \n-]{0,40}", n in 0usize..4) {
            // Any junk document between good ones never costs the good ones.
            let junk = bad.replace("---", "-").replace("...", ".");
            let mut text = String::new();
            for _ in 0..n {
                text += NODEPORT_SEED;
                text += "---\n";
            }
            text += &junk;
            text += "\n---\n";
            text += CONFIGMAP_SEED;
            let p = parse_text("p", &text);
            let good = p.objects.iter().filter(|o| o.meta().name == "nextcloud-dev-nodeport" || o.meta().name == "config").count();
            prop_assert_eq!(good, n + 1);
        }
    }
}
