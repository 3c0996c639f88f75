//! End to end: `ferry demo` replays the seed on a fresh lab and leaves nothing behind.

mod common;

use std::process::Command;

#[test]
fn demo_replays_the_seed() {
    if !common::root("demo_replays_the_seed") {
        return;
    }
    let prefix = ferry_lab::Lab::unique_prefix();
    let _cleanup = common::DownOnDrop(prefix.clone());
    let out = Command::new(common::FERRY)
        .args(["demo", "--prefix", &prefix])
        .output()
        .expect("running ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferry demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "$ ferry lab apply -f nextcloud-dev.yaml",
        "deployment.apps/nextcloud-dev created",
        "service/nextcloud-dev-clusterip created",
        "$ ferry lab get pods,svc -o wide",
        "service/nextcloud-dev-clusterip   ClusterIP",
        "service \"nextcloud-dev-clusterip\" deleted",
        "service/nextcloud-dev-nodeport created",
        "# all nextcloud pods answered through the cluster IP",
        "# k3s-master-rpi001 forwarded the node port to pod nextcloud-dev-",
        "# k3s-worker-rpi002 forwarded the node port to pod nextcloud-dev-",
        "# demo finished",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert_eq!(common::namespaces_of(&prefix), Vec::<String>::new());
}
