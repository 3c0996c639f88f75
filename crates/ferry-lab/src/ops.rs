//! Lab operations that take the lab lock, read lab.json, act and save: shared by the CLI, the
//! library API and the demo.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};

use crate::manifests::{self, Doc, Report};
use crate::state::{require_state, save_state, Ctx, LabLock, LabState};
use crate::sys;

/// lab.json, read under the lock.
pub fn state(ctx: &Ctx) -> Result<LabState> {
    let _lock = LabLock::acquire(ctx)?;
    require_state(ctx)
}

fn with_state<T>(ctx: &Ctx, f: impl FnOnce(&mut LabState) -> Result<T>) -> Result<T> {
    let _lock = LabLock::acquire(ctx)?;
    let mut st = require_state(ctx)?;
    let r = f(&mut st);
    // Save even after an error: pods may have been made or removed before it.
    save_state(ctx, &st)?;
    r
}

/// lab.json when the lab runs an API server (then objects go through it, and the lock is not
/// held while the lab runtime acts on them).
fn api_state(ctx: &Ctx) -> Result<Option<LabState>> {
    let st = state(ctx)?;
    Ok(st.api.is_some().then_some(st))
}

pub fn apply(ctx: &Ctx, docs: &[Doc]) -> Result<Report> {
    if let Some(st) = api_state(ctx)? {
        return crate::client::apply(ctx, &st, docs);
    }
    with_state(ctx, |st| Ok(manifests::apply(ctx, st, docs)))
}

pub fn delete(ctx: &Ctx, docs: &[Doc]) -> Result<Report> {
    if api_state(ctx)?.is_some() {
        return crate::client::delete(ctx, docs);
    }
    with_state(ctx, |st| Ok(manifests::delete(ctx, st, docs)))
}

pub fn delete_named(
    ctx: &Ctx,
    resource: &str,
    namespace: &str,
    names: &[String],
) -> Result<Report> {
    if api_state(ctx)?.is_some() {
        let docs = manifests::named_docs(resource, namespace, names)?;
        return crate::client::delete(ctx, &docs);
    }
    with_state(ctx, |st| {
        manifests::delete_named(ctx, st, resource, namespace, names)
    })
}

pub fn set_ready(ctx: &Ctx, pod: &str, ready: bool) -> Result<String> {
    if let Some(st) = api_state(ctx)? {
        return crate::client::set_ready(ctx, &st, pod, ready);
    }
    with_state(ctx, |st| manifests::set_ready(ctx, st, pod, ready))
}

/// The namespace of a target (node name, pod name, `client`, `lan`).
pub fn target_ns(ctx: &Ctx, target: &str) -> Result<String> {
    let st = state(ctx)?;
    st.target_ns(target).with_context(|| {
        format!(
            "no node, pod or `client` named {target:?} in lab {:?} (nodes: {}; pods: {})",
            ctx.prefix,
            st.node_names().join(", "),
            st.pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Runs a command in a target's namespace with inherited stdio; returns its exit code (128+N
/// when killed by signal N). The lock is not held while it runs.
pub fn exec_interactive(ctx: &Ctx, target: &str, cmd: &[String]) -> Result<i32> {
    let ns = target_ns(ctx, target)?;
    let (prog, args) = cmd.split_first().context("no command given after --")?;
    let status = Command::new("ip")
        .args(["netns", "exec", &ns, prog])
        .args(args)
        .status()
        .context("running `ip netns exec`")?;
    Ok(exit_code(status))
}

pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Runs a command in a target's namespace, capturing its output.
pub fn exec_output(ctx: &Ctx, target: &str, cmd: &[&str]) -> Result<Output> {
    let ns = target_ns(ctx, target)?;
    sys::exec_output(&ns, cmd)
}

/// `curl -sS --max-time 2 URL` from a target; Ok(body) on success.
pub fn curl(ctx: &Ctx, target: &str, url: &str) -> Result<String> {
    let out = exec_output(ctx, target, &["curl", "-sS", "--max-time", "2", url])?;
    if !out.status.success() {
        anyhow::bail!(
            "curl {url} from {target} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spawns a command in a target's namespace without waiting (for tests that need a process
/// running inside the lab; `down` stops whatever is left in lab namespaces).
pub fn spawn(ctx: &Ctx, target: &str, cmd: &[&str]) -> Result<std::process::Child> {
    let ns = target_ns(ctx, target)?;
    let (prog, args) = cmd.split_first().context("empty command")?;
    Command::new("ip")
        .args(["netns", "exec", &ns, prog])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip netns exec`")
}

/// `ferry explain` in `node`'s namespace with its agent's own settings (source, state, CIDRs,
/// extra flags) and `args` (--from, --to, -o ...): the live node's answer, kernel included.
pub fn explain(ctx: &Ctx, node: &str, args: &[&str]) -> Result<Output> {
    let exe = ctx.exe.display().to_string();
    let mut agent = crate::topology::agent_args(ctx, node);
    // Settings the agent has that explain has no use for are still accepted (same flags).
    agent[0] = "explain".into();
    let mut cmd: Vec<&str> = vec![exe.as_str()];
    cmd.extend(agent.iter().map(String::as_str));
    cmd.extend_from_slice(args);
    exec_output(ctx, node, &cmd)
}
