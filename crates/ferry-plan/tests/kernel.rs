//! Planned tables and the differ's scripts against the real nftables, each test in a network
//! namespace of its own (deleted afterwards, also when the test fails).
//!
//! Needs root, `ip` and `nft`. Without root the tests print a `ferry-test-skipped:` line and pass,
//! unless the environment variable CI is set: then they fail.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use ferry_model::view::{ResolvedEndpoint, ResolvedService};
use ferry_model::Protocol;
use ferry_plan::diff::{fingerprint_of_comment, LiveChain, LiveSet, LiveState};
use ferry_plan::ir::{BaseChain, ChainType, Hook, Verdict};
use ferry_plan::{diff, plan, Ruleset};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

// ---- a network namespace per test ----

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh network namespace, deleted on drop.
struct Netns {
    name: String,
}

fn run(cmd: &mut Command, stdin: &str) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .map_err(|e| format!("{cmd:?}: writing stdin: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// True when `CI` is set to something non-empty (an empty `CI` counts as unset everywhere).
fn ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Skips (part of) `test` because of `why`, or panics when [`ci`] holds. A skip writes one
/// line `ferry-test-skipped: BINARY/THREAD/TEST: WHY` (the harness names a test's thread after
/// the test) straight to the process's stderr, past the test harness's capture, so that
/// `.ci/run` counts it, once per test, even for a passing test.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    if ci() {
        panic!("{test}: {why}, and CI is set: not skipping");
    }
    let exe = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let key = format!(
        "{exe}/{}/{test}",
        std::thread::current().name().unwrap_or("?")
    )
    .replace(": ", ":");
    let _ = writeln!(std::io::stderr(), "ferry-test-skipped: {key}: {why}");
}

impl Netns {
    /// None (after saying so) when not root; fails instead when $CI is set.
    fn new() -> Option<Netns> {
        let uid = run(Command::new("id").arg("-u"), "").expect("id -u");
        if uid.trim() != "0" {
            skip("kernel tests", "need root (network namespaces)");
            return None;
        }
        let name = format!(
            "ferryplan-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]), "").expect("ip netns add");
        Some(Netns { name })
    }

    fn nft(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        run(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "nft"])
                .args(args),
            stdin,
        )
    }

    /// `nft -f -`: one script, one transaction.
    fn apply(&self, script: &str) -> Result<(), String> {
        self.nft(&["-f", "-"], script).map(|_| ())
    }

    fn list_text(&self) -> String {
        self.nft(&["list", "table", "inet", "ferry"], "")
            .expect("nft list table")
    }

    fn list_json(&self) -> Json {
        let text = self
            .nft(&["-j", "list", "table", "inet", "ferry"], "")
            .expect("nft -j list table");
        Json::parse(&text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name]), "") {
            eprintln!("could not delete netns {}: {e}", self.name);
        }
    }
}

// ---- just enough JSON to read `nft -j` ----

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// As written.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing text in JSON");
        v
    }
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }
    /// A scalar as nft prints it in a key.
    fn scalar_text(&self) -> String {
        match self {
            Json::Str(s) | Json::Num(s) => s.clone(),
            other => panic!("not a scalar: {other:?}"),
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(
            self.s.get(self.i),
            Some(&c),
            "JSON: expected {:?} at {}",
            c as char,
            self.i
        );
        self.i += 1;
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).expect("JSON: unexpected end")
    }
    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.eat(b'{');
                let mut kv = vec![];
                if self.peek() == b'}' {
                    self.i += 1;
                    return Json::Obj(kv);
                }
                loop {
                    let k = self.string();
                    self.eat(b':');
                    kv.push((k, self.value()));
                    if self.peek() == b',' {
                        self.i += 1;
                    } else {
                        self.eat(b'}');
                        return Json::Obj(kv);
                    }
                }
            }
            b'[' => {
                self.eat(b'[');
                let mut a = vec![];
                if self.peek() == b']' {
                    self.i += 1;
                    return Json::Arr(a);
                }
                loop {
                    a.push(self.value());
                    if self.peek() == b',' {
                        self.i += 1;
                    } else {
                        self.eat(b']');
                        return Json::Arr(a);
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && !b",]} \n\t\r".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.i]).expect("utf-8");
                match word {
                    "null" => Json::Null,
                    "true" => Json::Bool(true),
                    "false" => Json::Bool(false),
                    n => {
                        assert!(n.parse::<f64>().is_ok(), "JSON: bad literal {n:?}");
                        Json::Num(n.to_string())
                    }
                }
            }
        }
    }
    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = Vec::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).expect("utf-8"),
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            self.i += 4;
                            char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap_or('?')
                        }
                        other => other as char,
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

// ---- reading ferry's table back ----

/// A key as `nft -j` gives it: a scalar, `{"concat": [...]}`, or either inside
/// `{"elem": {"val": ..., "comment": ...}}`.
fn key_text(k: &Json) -> String {
    let k = k.get("elem").and_then(|e| e.get("val")).unwrap_or(k);
    match k.get("concat") {
        Some(parts) => parts
            .arr()
            .iter()
            .map(Json::scalar_text)
            .collect::<Vec<_>>()
            .join(" . "),
        None => k.scalar_text(),
    }
}

fn verdict(v: &Json) -> Verdict {
    let target = |k: &str| {
        v.get(k)
            .and_then(|t| t.get("target"))
            .and_then(Json::str)
            .map(String::from)
    };
    if let Some(t) = target("goto") {
        Verdict::Goto(t)
    } else if let Some(t) = target("jump") {
        Verdict::Jump(t)
    } else if v.get("accept").is_some() {
        Verdict::Accept
    } else if v.get("drop").is_some() {
        Verdict::Drop
    } else if v.get("return").is_some() {
        Verdict::Return
    } else {
        panic!("unknown verdict {v:?}")
    }
}

/// ferry's table as `nft -j list table inet ferry` shows it, in the differ's terms.
fn live_state(json: &Json) -> LiveState {
    let mut live = LiveState::default();
    let mut first_comment: BTreeMap<String, Option<String>> = BTreeMap::new();
    for item in json.get("nftables").expect("nftables").arr() {
        if item.get("table").is_some() {
            live.table = true;
        } else if let Some(c) = item.get("chain") {
            let name = c.get("name").and_then(Json::str).expect("name").to_string();
            let base = c.get("hook").map(|h| BaseChain {
                type_: match c.get("type").and_then(Json::str) {
                    Some("nat") => ChainType::Nat,
                    Some("filter") => ChainType::Filter,
                    t => panic!("chain type {t:?}"),
                },
                hook: match h.str() {
                    Some("prerouting") => Hook::Prerouting,
                    Some("output") => Hook::Output,
                    Some("postrouting") => Hook::Postrouting,
                    h => panic!("hook {h:?}"),
                },
                priority: c
                    .get("prio")
                    .map(Json::scalar_text)
                    .expect("prio")
                    .parse()
                    .expect("numeric prio"),
            });
            live.chains.insert(
                name,
                LiveChain {
                    base,
                    fingerprint: None,
                },
            );
        } else if let Some(r) = item.get("rule") {
            let chain = r
                .get("chain")
                .and_then(Json::str)
                .expect("chain")
                .to_string();
            let comment = r.get("comment").and_then(Json::str).map(String::from);
            first_comment.entry(chain).or_insert(comment);
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            let name = s.get("name").and_then(Json::str).expect("name").to_string();
            let ty = s.get("type").expect("type");
            let key = match ty {
                Json::Arr(parts) => parts
                    .iter()
                    .map(Json::scalar_text)
                    .collect::<Vec<_>>()
                    .join(" . "),
                t => t.scalar_text(),
            };
            let is_map = item.get("map").is_some();
            let signature = match s.get("map") {
                Some(m) => format!("{key} : {}", m.scalar_text()),
                None => key,
            };
            let mut elements = BTreeMap::new();
            for e in s.get("elem").map(Json::arr).unwrap_or_default() {
                let (k, v) = if is_map {
                    let pair = e.arr();
                    assert_eq!(pair.len(), 2, "map element {e:?}");
                    (key_text(&pair[0]), Some(verdict(&pair[1])))
                } else {
                    (key_text(e), None)
                };
                elements.insert(k, v);
            }
            live.sets.insert(
                name,
                LiveSet {
                    signature,
                    elements,
                },
            );
        }
    }
    for (chain, comment) in first_comment {
        let c = live
            .chains
            .get_mut(&chain)
            .unwrap_or_else(|| panic!("a rule of unlisted chain {chain}"));
        c.fingerprint = comment.as_deref().and_then(fingerprint_of_comment);
    }
    live
}

/// The kernel holds exactly `rs`: the same chains (bases, fingerprints in the first rules),
/// sets and elements, so the differ has nothing to do.
fn assert_kernel_holds(ns: &Netns, rs: &Ruleset) {
    let live = live_state(&ns.list_json());
    let want = LiveState::of(rs);
    let service_ips = |l: &LiveState| {
        l.sets["service-ips-v4"]
            .elements
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        service_ips(&live),
        service_ips(&want),
        "service-ips-v4 keys"
    );
    for (name, c) in &rs.chains {
        let got = live.chains.get(name).map(|l| l.fingerprint.clone());
        assert_eq!(
            got,
            Some(Some(c.fingerprint())),
            "fingerprint of chain {name}"
        );
    }
    assert_eq!(
        live.chains.keys().collect::<Vec<_>>(),
        want.chains.keys().collect::<Vec<_>>()
    );
    for (name, s) in &want.sets {
        assert_eq!(live.sets.get(name), Some(s), "set {name}");
    }
    assert_eq!(live, want);
    let again = diff(&live, rs);
    assert!(again.is_empty(), "read back, still differs: {again}");
}

fn sample<S: Strategy>(runner: &mut TestRunner, s: S) -> S::Value {
    s.new_tree(runner).expect("a value").current()
}

/// The seed's services and `n` random ones (about a quarter IPv6).
fn realistic(runner: &mut TestRunner, n: usize) -> Vec<ResolvedService> {
    let specs = sample(runner, proptest::collection::vec(service_spec(), n));
    let mut services = seed_services();
    services.extend(services_from_specs(&specs));
    services
}

// ---- tests ----

#[test]
fn a_realistic_table_loads_and_reads_back_as_planned() {
    let Some(ns) = Netns::new() else { return };
    let mut runner = TestRunner::deterministic();
    let services = realistic(&mut runner, 50);
    assert!(services.iter().any(|s| s.cluster_ip.unwrap().is_ipv6()));
    let rs = plan(&dual_stack_config(), &services);
    let script = diff(&LiveState::default(), &rs).script;
    ns.apply(&script)
        .unwrap_or_else(|e| panic!("full load refused: {e}\nscript:\n{script}"));

    let text = ns.list_text();
    for s in rs.sets.values() {
        let kind = if s.is_vmap { "map" } else { "set" };
        assert!(
            text.contains(&format!("\t{kind} {} {{", s.name)),
            "{kind} {} missing",
            s.name
        );
    }
    for c in rs.chains.keys() {
        assert!(
            text.contains(&format!("\tchain {c} {{")),
            "chain {c} missing"
        );
    }
    assert!(
        text.contains(
            "10.43.7.203 . tcp . 8080 comment \"default/nextcloud-dev-clusterip 8080/TCP\" : goto service-default/nextcloud-dev-clusterip/tcp/8080"
        ),
        "{text}"
    );
    assert_kernel_holds(&ns, &rs);
}

#[test]
fn incremental_scripts_apply_on_top_of_what_the_kernel_has() {
    let Some(ns) = Netns::new() else { return };
    let mut runner = TestRunner::deterministic();
    for round in 0..6 {
        let a = sample(
            &mut runner,
            proptest::collection::vec(service_spec(), 10..40),
        );
        let other = sample(
            &mut runner,
            proptest::collection::vec(service_spec(), 10..45),
        );
        let changes = sample(&mut runner, proptest::collection::vec(change(), 45));
        let cfg = dual_stack_config();
        let mut sa = seed_services();
        sa.extend(services_from_specs(&a));
        let mut sb = seed_services();
        sb.extend(evolve(&a, &other, &changes));
        // The seed changes too: nextcloud loses a pod, then all pods.
        if round % 2 == 1 {
            sb[0].ports[0].endpoints.pop();
            sb[1].ports[0].endpoints.clear();
        }
        let (ra, rb) = (plan(&cfg, &sa), plan(&cfg, &sb));

        ns.apply("flush ruleset\n").expect("flush ruleset");
        ns.apply(&ra.render_full())
            .unwrap_or_else(|e| panic!("round {round}: loading A refused: {e}"));
        assert_kernel_holds(&ns, &ra);
        for (from, to, what) in [(&ra, &rb, "A->B"), (&rb, &ra, "B->A")] {
            let ch = diff(&LiveState::of(from), to);
            assert!(!ch.full, "round {round} {what}");
            ns.apply(&ch.script).unwrap_or_else(|e| {
                panic!(
                    "round {round} {what} ({ch}) refused: {e}\nscript:\n{}",
                    ch.script
                )
            });
            assert_kernel_holds(&ns, to);
        }
    }
}

#[test]
fn a_changed_layout_is_replaced_in_one_transaction() {
    let Some(ns) = Netns::new() else { return };
    let rs = plan(&config(), &seed_services());
    ns.apply(&rs.render_full()).expect("load");
    // What the kernel has, with hairpin-v4 of another type (as an older ferry might have made).
    let mut live = live_state(&ns.list_json());
    live.sets.get_mut("hairpin-v4").unwrap().signature = "ipv4_addr".into();
    let ch = diff(&live, &rs);
    assert!(ch.full);
    ns.apply(&ch.script).expect("replace the table");
    assert_kernel_holds(&ns, &rs);
}

#[test]
fn leftover_maps_pointing_at_leftover_chains_are_removed() {
    let Some(ns) = Netns::new() else { return };
    let b = plan(&config(), &seed_services());
    let a = with_leftovers(b.clone());
    ns.apply(&a.render_full()).expect("load A");
    let live = live_state(&ns.list_json());
    assert_eq!(live, LiveState::of(&a));
    let ch = diff(&live, &b);
    ns.apply(&ch.script)
        .unwrap_or_else(|e| panic!("refused: {e}\nscript:\n{}", ch.script));
    assert_kernel_holds(&ns, &b);
}

#[test]
fn comments_and_names_at_their_longest_load() {
    let Some(ns) = Netns::new() else { return };
    // Namespace and name at Kubernetes' 63-character limit, a named SCTP port at 65535.
    let long = "a".repeat(63);
    let svc = Svc::new(&long, "10.43.9.9")
        .namespace(&"n".repeat(63))
        .named_port(
            &"p".repeat(15),
            Protocol::Sctp,
            65535,
            Some(32767),
            &[ep("10.42.0.9", 65535)],
        )
        .external_ip("192.168.2.60")
        .build();
    let rs = plan(&config(), &[svc]);
    let script = rs.render_full();
    ns.apply(&script)
        .unwrap_or_else(|e| panic!("refused: {e}\nscript:\n{script}"));
    assert_kernel_holds(&ns, &rs);
}

#[test]
fn changed_verdicts_at_the_same_key_apply() {
    let Some(ns) = Netns::new() else { return };
    let web = |eps: &[ResolvedEndpoint]| {
        Svc::new("web", "10.43.2.1")
            .node_port(Protocol::Tcp, 80, 30080, eps)
            .external_ip("192.168.2.50")
    };
    let local_pod = [ep("10.42.0.85", 80).on(NODE)];
    let cfg = config();
    // No endpoints: reject -> drop. With one: goto external-... -> goto local-...
    let steps = [
        plan(&cfg, &[web(&[]).build()]),
        plan(&cfg, &[web(&[]).external_policy_local().build()]),
        plan(&cfg, &[web(&local_pod).external_policy_local().build()]),
        plan(&cfg, &[web(&local_pod).build()]),
        plan(&cfg, &[web(&[]).build()]),
    ];
    ns.apply(&steps[0].render_full()).expect("load");
    for (i, pair) in steps.windows(2).enumerate() {
        let ch = diff(&LiveState::of(&pair[0]), &pair[1]);
        assert!(ch.elements_deleted > 0 && !ch.full, "step {i}: {ch}");
        ns.apply(&ch.script)
            .unwrap_or_else(|e| panic!("step {i} refused: {e}\nscript:\n{}", ch.script));
        assert_kernel_holds(&ns, &pair[1]);
    }
}
