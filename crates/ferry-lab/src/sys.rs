//! Thin wrappers around iproute2, network namespaces and processes.
//!
//! Everything here acts inside named network namespaces (`ip -n NS`, `ip netns exec NS`, or a
//! short-lived thread that entered the namespace with setns); nothing touches the root
//! namespace's interfaces, routes or firewall.

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Runs `ip ARGS`, returning stdout; the error carries stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs several `ip` commands in one process (`ip [-n NS] -batch -`).
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running `ip -batch`")?;
    let mut script = lines.join("\n");
    script.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed: {}\nscript:\n{}",
            ns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            script.trim_end()
        );
    }
    Ok(())
}

/// `ip -n NS -force -batch -`: runs every line even after failures (for cleanup).
pub fn ip_batch_force(ns: &str, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("running `ip -force -batch`")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(format!("{}\n", lines.join("\n")).as_bytes())?;
    }
    child.wait()?;
    Ok(())
}

/// Names from `ip netns list`.
pub fn list_netns() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

pub fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Creates namespaces in one `ip -batch`.
pub fn add_netns(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    ip_batch(None, &lines)
}

/// Deletes namespaces (ignoring ones already gone).
pub fn del_netns(names: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for n in names {
        if !netns_exists(n) {
            continue;
        }
        if let Err(e) = ip(&["netns", "del", n]) {
            failed.push(format!("{n}: {e:#}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("deleting namespaces: {}", failed.join("; "))
    }
}

/// PIDs of processes in a namespace (`ip netns pids NS`).
pub fn netns_pids(ns: &str) -> Vec<u32> {
    if !netns_exists(ns) {
        return Vec::new();
    }
    ip(&["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Inode of a named namespace, to compare with /proc/PID/ns/net.
fn netns_inode(ns: &str) -> Option<u64> {
    fs::metadata(Path::new("/run/netns").join(ns))
        .ok()
        .map(|m| m.ino())
}

/// Whether `pid` lives in network namespace `ns` (false for zombies and dead processes).
pub fn pid_in_netns(pid: u32, ns: &str) -> bool {
    let Some(ino) = netns_inode(ns) else {
        return false;
    };
    match fs::read_link(format!("/proc/{pid}/ns/net")) {
        Ok(link) => link.to_string_lossy() == format!("net:[{ino}]"),
        Err(_) => false,
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: setns on a namespace fd we own; only this short-lived thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering namespace {ns}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
    })
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside namespace `ns`.
pub fn set_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&path, value).with_context(|| format!("setting {key}={value} in {ns}"))?;
        }
        Ok(())
    })?
}

/// Runs a command inside a namespace and captures its output.
pub fn exec_output(ns: &str, cmd: &[&str]) -> Result<Output> {
    let (prog, args) = cmd.split_first().context("empty command")?;
    Command::new("ip")
        .args(["netns", "exec", ns, prog])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip netns exec {ns} {}`", cmd.join(" ")))
}

/// Process state letter from /proc/PID/stat (None when gone).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ..." where comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Alive and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Reaps `pid` if it is our child (harmless otherwise).
fn try_reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid.
    unsafe {
        libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG);
    }
}

fn send_signal(pid: u32, sig: libc::c_int) {
    if pid <= 1 {
        return;
    }
    // SAFETY: plain kill(2) on a positive pid.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Stops processes: SIGTERM (or SIGKILL when `hard`), waits up to `grace`, then SIGKILL.
/// Only PIDs that `pid_ok` accepts are signalled (callers check the namespace, so a recycled
/// PID of an unrelated process is never hit). Returns how many were signalled.
pub fn stop_pids(pids: &[u32], hard: bool, grace: Duration, pid_ok: impl Fn(u32) -> bool) -> usize {
    let targets: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| p > 1 && pid_alive(p) && pid_ok(p))
        .collect();
    for &p in &targets {
        send_signal(p, if hard { libc::SIGKILL } else { libc::SIGTERM });
    }
    let deadline = Instant::now() + grace;
    let mut killed = hard;
    loop {
        for &p in &targets {
            try_reap(p);
        }
        let alive: Vec<u32> = targets.iter().copied().filter(|&p| pid_alive(p)).collect();
        if alive.is_empty() {
            break;
        }
        if !killed && Instant::now() >= deadline {
            for &p in &alive {
                send_signal(p, libc::SIGKILL);
            }
            killed = true;
        }
        if killed && Instant::now() >= deadline + Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    targets.len()
}

/// Sends one ICMP echo request from namespace `ns` to `dst` and waits for the reply.
pub fn ping(ns: &str, dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    in_netns(ns, || ping_here(dst, timeout))?
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping_here(dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    // SAFETY: creating a socket; the fd is immediately owned by a UdpSocket (which only uses
    // sendto/recvfrom/setsockopt/close, all fine on a raw socket).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw ICMP socket");
    }
    // SAFETY: fd is a fresh, valid socket we own.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let seq: u16 = 1;
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"ferry-lab-ping");
    let sum = icmp_checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let start = Instant::now();
    sock.send_to(&pkt, (dst, 0))
        .with_context(|| format!("sending ICMP echo to {dst}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!("no ICMP echo reply from {dst} within {timeout:?}");
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return Err(e).context("receiving ICMP"),
        };
        if from.ip() != std::net::IpAddr::V4(dst) || n < 20 {
            continue;
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 8 {
            continue;
        }
        let icmp = &buf[ihl..n];
        if icmp[0] == 0
            && u16::from_be_bytes([icmp[4], icmp[5]]) == id
            && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
        {
            return Ok(start.elapsed());
        }
    }
}

/// Random lowercase letters and digits (the alphabet Kubernetes uses for name suffixes).
pub fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bytes = vec![0u8; len];
    let filled = File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !filled {
        let seed =
            crate::state::fnv64(format!("{:?}{}", Instant::now(), std::process::id()).as_bytes());
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> ((i * 8) % 64)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}
