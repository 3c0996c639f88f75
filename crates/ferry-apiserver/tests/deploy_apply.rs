//! ferry's install manifests apply cleanly with the real kubectl (`kubectl apply -f
//! deploy/metallb-crds.yaml -f deploy/ferry.yaml`), and again without changes. Skips without
//! kubectl unless `CI`.

mod common;

use std::process::Command;

use common::{kubectl_path, require_or_skip, Lab};

#[test]
fn the_install_manifests_apply_cleanly() {
    let Some(bin) = kubectl_path() else {
        require_or_skip("kubectl");
        return;
    };
    let lab = Lab::quick();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let kubectl = |args: &[&str]| -> String {
        let out = Command::new(&bin)
            .arg("--kubeconfig")
            .arg(&lab.kubeconfig)
            .arg("--cache-dir")
            .arg(lab.path("cache"))
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let crds = format!("{deploy}/metallb-crds.yaml");
    let ferry = format!("{deploy}/ferry.yaml");
    let first = kubectl(&["apply", "-f", &crds, "-f", &ferry]);
    for line in [
        "customresourcedefinition.apiextensions.k8s.io/ipaddresspools.metallb.io created",
        "namespace/ferry-system created",
        "serviceaccount/ferry created",
        "clusterrole.rbac.authorization.k8s.io/ferry created",
        "clusterrolebinding.rbac.authorization.k8s.io/ferry created",
        "role.rbac.authorization.k8s.io/ferry-leader-election created",
        "rolebinding.rbac.authorization.k8s.io/ferry-config created",
        "daemonset.apps/ferry created",
    ] {
        assert!(first.contains(line), "missing {line:?} in:\n{first}");
    }
    let again = kubectl(&["apply", "-f", &crds, "-f", &ferry]);
    assert!(
        again.lines().all(|l| l.ends_with(" unchanged")),
        "a second apply changed something:\n{again}"
    );
    let ds = kubectl(&[
        "-n",
        "ferry-system",
        "get",
        "ds",
        "ferry",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].securityContext.capabilities.add}",
    ]);
    assert_eq!(ds, r#"["NET_ADMIN","NET_RAW"]"#);
}
