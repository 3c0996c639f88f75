//! `ferry lab get`: kubectl-like tables of pods, deployments and nodes; services come from
//! `ferry get svc` (which knows the allocated cluster IPs and node ports).

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::state::{now_secs, Ctx, LabState};

pub use ferry_model::display::table;

/// kubectl's age, at `now`, of something created at `created` (seconds since the epoch).
fn age(now: u64, created: u64) -> String {
    ferry_model::display::human_age(std::time::Duration::from_secs(now.saturating_sub(created)))
}

/// Which kinds a `get` argument names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pods,
    Services,
    Deployments,
    Nodes,
}

pub fn parse_kinds(what: &str) -> Result<Vec<Kind>> {
    what.split(',')
        .map(|k| {
            Ok(match k.trim().to_lowercase().as_str() {
                "po" | "pod" | "pods" => Kind::Pods,
                "svc" | "service" | "services" => Kind::Services,
                "deploy" | "deployment" | "deployments" | "deployments.apps" => Kind::Deployments,
                "no" | "node" | "nodes" => Kind::Nodes,
                other => bail!("error: the server doesn't have a resource type \"{other}\""),
            })
        })
        .collect()
}

/// Namespace filter of `get`.
#[derive(Debug, Clone)]
pub enum NsFilter {
    One(String),
    All,
}

impl NsFilter {
    fn matches(&self, ns: &str) -> bool {
        match self {
            NsFilter::One(n) => n == ns,
            NsFilter::All => true,
        }
    }
}

pub struct GetOutput {
    pub stdout: String,
    pub stderr: String,
    pub ok: bool,
}

/// Renders `get KINDS`; services by running `<ferry> get svc`.
pub fn get(ctx: &Ctx, st: &LabState, what: &str, wide: bool, ns: &NsFilter) -> Result<GetOutput> {
    let kinds = parse_kinds(what)?;
    let multi = kinds.len() > 1;
    let mut sections = Vec::new();
    let mut stderr = String::new();
    let mut ok = true;
    for kind in kinds {
        let api = st.api.is_some();
        let section = match kind {
            Kind::Pods => pods_table(st, wide, ns, multi),
            Kind::Deployments if api => {
                match crate::client::deployments_table(ctx, ns, wide, multi) {
                    Ok(t) => t,
                    Err(e) => {
                        stderr.push_str(&format!("{e:#}\n"));
                        ok = false;
                        None
                    }
                }
            }
            Kind::Services if api => match crate::client::services_table(ctx, ns, wide, multi) {
                Ok(t) => t,
                Err(e) => {
                    stderr.push_str(&format!("{e:#}\n"));
                    ok = false;
                    None
                }
            },
            Kind::Deployments => deployments_table(st, wide, ns, multi),
            Kind::Nodes => nodes_table(st, wide, multi),
            Kind::Services => {
                let mut args = vec!["svc"];
                if wide {
                    args.extend(["-o", "wide"]);
                }
                match ns {
                    NsFilter::All => args.push("-A"),
                    NsFilter::One(n) => args.extend(["-n", n.as_str()]),
                }
                match ferry_get(ctx, &args) {
                    Ok(text) if multi => Some(prefix_names(&text, "service/")),
                    Ok(text) => Some(text),
                    Err(e) => {
                        stderr.push_str(&format!("{e:#}\n"));
                        ok = false;
                        None
                    }
                }
            }
        };
        match section {
            Some(s) if !s.trim().is_empty() => sections.push(s),
            _ if !multi && (kind != Kind::Services || st.api.is_some()) && ok => {
                let where_ = match ns {
                    NsFilter::One(n) => format!(" in {n} namespace"),
                    NsFilter::All => String::new(),
                };
                stderr.push_str(&format!("No resources found{where_}.\n"));
            }
            _ => {}
        }
    }
    Ok(GetOutput {
        stdout: sections.join("\n"),
        stderr,
        ok,
    })
}

/// Runs `<ferry exe> get ARGS --manifests M --state-dir S`, returning stdout.
pub fn ferry_get(ctx: &Ctx, args: &[&str]) -> Result<String> {
    if crate::state::load_state(ctx)?.is_some_and(|s| s.api.is_some()) {
        return crate::client::ferry_get(ctx, args);
    }
    let out = Command::new(ctx.require_exe(crate::state::FERRY_EXE_NAME)?)
        .arg("get")
        .args(args)
        .arg("--manifests")
        .arg(ctx.manifests())
        .arg("--state-dir")
        .arg(ctx.state_dir())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} get", ctx.exe.display()))?;
    if !out.status.success() {
        bail!(
            "`ferry get {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prefixes the first column of a kubectl table (except the header) and re-aligns it.
pub fn prefix_names(text: &str, prefix: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(header) = lines.first() else {
        return String::new();
    };
    if !header.starts_with("NAME") {
        return text.to_string();
    }
    // Where the second column starts in the header: after "NAME" and its padding.
    let after_name = &header[4..];
    let col2 = 4 + (after_name.len() - after_name.trim_start().len());
    if col2 == 4 || col2 >= header.len() {
        // Only one column: just prefix.
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            if i > 0 && !l.is_empty() {
                out.push_str(prefix);
            }
            out.push_str(l);
            out.push('\n');
        }
        return out;
    }
    let mut rows: Vec<(String, String)> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let (first, rest) = if l.len() > col2 && l.is_char_boundary(col2) {
            (l[..col2].trim_end().to_string(), l[col2..].to_string())
        } else {
            (l.trim_end().to_string(), String::new())
        };
        let first = if i > 0 && !first.is_empty() {
            format!("{prefix}{first}")
        } else {
            first
        };
        rows.push((first, rest));
    }
    let width = rows
        .iter()
        .map(|(f, _)| f.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (first, rest) in rows {
        if rest.is_empty() {
            out.push_str(&first);
        } else {
            out.push_str(&format!("{first:<width$}   {rest}"));
        }
        out.push('\n');
    }
    out
}

fn pods_table(st: &LabState, wide: bool, ns: &NsFilter, multi: bool) -> Option<String> {
    let mut pods: Vec<_> = st
        .pods
        .iter()
        .filter(|p| ns.matches(&p.namespace))
        .collect();
    if pods.is_empty() {
        return None;
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let all = matches!(ns, NsFilter::All);
    let mut header: Vec<&str> = Vec::new();
    if all {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    if wide {
        header.extend(["IP", "NODE", "NOMINATED NODE", "READINESS GATES"]);
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    let now = now_secs();
    for p in pods {
        let alive = p.pid.is_some_and(crate::sys::pid_alive);
        let mut row = Vec::new();
        if all {
            row.push(p.namespace.clone());
        }
        row.push(if multi {
            format!("pod/{}", p.name)
        } else {
            p.name.clone()
        });
        row.push(if p.ready && alive { "1/1" } else { "0/1" }.to_string());
        row.push(if alive { "Running" } else { "Error" }.to_string());
        row.push("0".to_string());
        row.push(age(now, p.created));
        if wide {
            row.push(p.ip.to_string());
            row.push(p.node.clone());
            row.push("<none>".to_string());
            row.push("<none>".to_string());
        }
        rows.push(row);
    }
    Some(table(&rows))
}

fn deployments_table(st: &LabState, wide: bool, ns: &NsFilter, multi: bool) -> Option<String> {
    let deps: Vec<_> = st
        .deployments
        .iter()
        .filter(|d| ns.matches(&d.namespace))
        .collect();
    if deps.is_empty() {
        return None;
    }
    let mut header = vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"];
    if wide {
        header.extend(["SELECTOR"]);
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    let now = now_secs();
    for d in deps {
        let key = d.key();
        let pods: Vec<_> = st
            .pods
            .iter()
            .filter(|p| p.owner.as_deref() == Some(key.as_str()))
            .collect();
        let ready = pods.iter().filter(|p| p.ready).count();
        let mut row = vec![
            if multi {
                format!("deployment.apps/{}", d.name)
            } else {
                d.name.clone()
            },
            format!("{ready}/{}", d.replicas),
            pods.len().to_string(),
            ready.to_string(),
            age(now, d.created),
        ];
        if wide {
            let sel: Vec<String> = d
                .pod_labels
                .iter()
                .filter(|(k, _)| *k != "pod-template-hash")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            row.push(sel.join(","));
        }
        rows.push(row);
    }
    Some(table(&rows))
}

fn nodes_table(st: &LabState, wide: bool, multi: bool) -> Option<String> {
    let mut header = vec!["NAME", "STATUS", "ROLES", "AGE", "VERSION"];
    if wide {
        header.extend(["INTERNAL-IP", "POD-CIDR"]);
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    let now = now_secs();
    for n in &st.nodes {
        let mut row = vec![
            if multi {
                format!("node/{}", n.name)
            } else {
                n.name.clone()
            },
            "Ready".to_string(),
            if n.index == 0 {
                "control-plane,master"
            } else {
                "<none>"
            }
            .to_string(),
            age(now, st.created),
            "ferry-lab".to_string(),
        ];
        if wide {
            row.push(n.ip.to_string());
            row.push(n.pod_cidr.clone());
        }
        rows.push(row);
    }
    Some(table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixing() {
        let t = "NAME         TYPE        CLUSTER-IP\nkubernetes   ClusterIP   10.43.0.1\nweb          NodePort    10.43.3.110\n";
        let p = prefix_names(t, "service/");
        assert_eq!(
            p,
            "NAME                 TYPE        CLUSTER-IP\nservice/kubernetes   ClusterIP   10.43.0.1\nservice/web          NodePort    10.43.3.110\n"
        );
    }
}
