//! How ferry's tests skip, in one place: a test that cannot run here (not root, a tool
//! missing) says so on a line `.ci/run` counts, and under `CI` it fails instead of skipping.
//! No dependencies beyond libc, so every crate's tests can use it.

/// For root-only tests: true when the test may run. Not root: [`skip`]s (panics when `CI` is
/// set: CI must not skip).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root (network namespaces)");
    }
    root
}

/// True when `CI` is set to something non-empty (an empty `CI` counts as unset everywhere).
pub fn ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Skips (part of) `test` because of `why`, or panics when [`ci`] holds. A skip writes one
/// line `ferry-test-skipped: BINARY/THREAD/TEST: WHY` (the harness names a test's thread after
/// the test) straight to the process's stderr, past the test harness's capture, so that
/// `.ci/run` counts it, once per test, even for a passing test.
pub fn skip(test: &str, why: &str) {
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
