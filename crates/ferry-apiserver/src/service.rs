//! What kube-apiserver does to a Service on create and update: defaults (type, protocol,
//! targetPort, sessionAffinity, traffic policies, IP families) and the allocation of the
//! cluster IP and node ports — IPv4 only, first free address of the upper part of the range
//! (kube-apiserver picks at random), explicit values honoured when in range and free.
//!
//! Deliberately independent of ferry's own allocator (`ferry-model`): a test double must not
//! share the code it tests.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use serde_json::{json, Value};

/// The service CIDR and the node-port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub cidr: Ipv4Addr,
    pub prefix: u8,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceConfig {
    /// K3s's (and ferry's) defaults: 10.43.0.0/16, node ports 30000-32767.
    fn default() -> Self {
        ServiceConfig {
            cidr: Ipv4Addr::new(10, 43, 0, 0),
            prefix: 16,
            node_ports: 30000..=32767,
        }
    }
}

impl ServiceConfig {
    /// Parses `a.b.c.d/n` (IPv4, prefix 8..=30).
    pub fn with_cidr(mut self, cidr: &str) -> Result<Self, String> {
        let (ip, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("service CIDR {cidr:?}: expected a.b.c.d/n"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("service CIDR {cidr:?}: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("service CIDR {cidr:?}: the prefix must be 8..=30"))?;
        self.cidr = Ipv4Addr::from(u32::from(ip) & mask(prefix));
        self.prefix = prefix;
        Ok(self)
    }

    fn range(&self) -> (u32, u32) {
        let base = u32::from(self.cidr);
        let size = 1u32 << (32 - self.prefix);
        // Network and broadcast addresses are not handed out.
        (base + 1, base + size - 2)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.range();
        (lo..=hi).contains(&u32::from(ip))
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn needs_node_ports(ty: &str, spec: &Value) -> bool {
    ty == "NodePort"
        || (ty == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"] != Value::Bool(false))
}

/// Defaults and allocates in `svc` (a Service about to be stored). `old` is the stored
/// version on update; `others` are the other stored Services (what they hold is taken).
/// Errors are `field: message` for a 422 Invalid.
pub fn prepare<'a>(
    svc: &mut Value,
    old: Option<&Value>,
    others: impl Iterator<Item = &'a Value>,
    cfg: &ServiceConfig,
) -> Result<(), String> {
    let mut used_ips = HashSet::new();
    let mut used_ports = HashSet::new();
    for o in others {
        if let Some(ip) = o["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            used_ips.insert(ip);
        }
        for p in o["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(np) = p["nodePort"].as_u64() {
                used_ports.insert(np);
            }
        }
        if let Some(np) = o["spec"]["healthCheckNodePort"].as_u64() {
            used_ports.insert(np);
        }
    }
    if !svc["spec"].is_object() {
        svc["spec"] = json!({});
    }
    let spec = &mut svc["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if !matches!(
        ty.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(format!(
            "spec.type: Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        ));
    }
    spec["type"] = json!(ty);
    if spec["sessionAffinity"].is_null() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec["sessionAffinity"] == "ClientIP"
        && spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"].is_null()
    {
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10800}});
    }
    if ty == "ExternalName" {
        if spec["externalName"].as_str().is_none_or(str::is_empty) {
            return Err("spec.externalName: Required value".into());
        }
        return Ok(());
    }
    if spec["internalTrafficPolicy"].is_null() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    if ty != "ClusterIP" && spec["externalTrafficPolicy"].is_null() {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }

    // Cluster IP: immutable once set; an update that leaves it out keeps the old one.
    let old_ip = old
        .and_then(|o| o["spec"]["clusterIP"].as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let asked = spec["clusterIP"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let ip = match (asked, old_ip) {
        (Some(a), Some(o)) if a != o => {
            return Err(format!(
                "spec.clusterIPs[0]: Invalid value: {a:?}: may not change once set"
            ))
        }
        (_, Some(o)) => o,
        (Some(a), None) if a == "None" => a,
        (Some(a), None) => {
            let ip: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("spec.clusterIPs[0]: Invalid value: {a:?}: must be a valid IPv4 address or None"))?;
            if !cfg.contains(ip) {
                return Err(format!(
                    "spec.clusterIPs[0]: Invalid value: {a:?}: failed to allocate IP {a}: the provided IP ({a}) is not in the valid range. The range of valid IPs is {}/{}",
                    cfg.cidr, cfg.prefix
                ));
            }
            if used_ips.contains(&ip) {
                return Err(format!(
                    "spec.clusterIPs[0]: Invalid value: {a:?}: failed to allocate IP {a}: provided IP is already allocated"
                ));
            }
            a
        }
        (None, None) => {
            let (lo, hi) = cfg.range();
            let size = hi - lo + 1;
            let band = (size / 16).clamp(16, 256).min(size / 2);
            let free = |n: &u32| !used_ips.contains(&Ipv4Addr::from(*n));
            (lo + band..=hi)
                .find(free)
                .or_else(|| (lo..lo + band).find(free))
                .map(|n| Ipv4Addr::from(n).to_string())
                .ok_or_else(|| {
                    format!(
                        "spec.clusterIPs: Internal error: range {}/{} is full",
                        cfg.cidr, cfg.prefix
                    )
                })?
        }
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    if spec["ipFamilies"].is_null() {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    if spec["ipFamilyPolicy"].is_null() {
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }

    // Ports: protocol and targetPort defaults; node ports for NodePort and LoadBalancer.
    let node_ports = needs_node_ports(&ty, spec);
    let old_ports: Vec<Value> = old
        .and_then(|o| o["spec"]["ports"].as_array().cloned())
        .unwrap_or_default();
    let mut mine = HashSet::new();
    let Some(ports) = spec["ports"].as_array_mut() else {
        if ip == "None" {
            return Ok(());
        }
        return Err("spec.ports: Required value".into());
    };
    for (i, p) in ports.iter_mut().enumerate() {
        let Some(port) = p["port"].as_u64().filter(|n| (1..=65535).contains(n)) else {
            return Err(format!(
                "spec.ports[{i}].port: Invalid value: {}: must be between 1 and 65535, inclusive",
                p["port"]
            ));
        };
        if p["protocol"].is_null() {
            p["protocol"] = json!("TCP");
        }
        if p["targetPort"].is_null() {
            p["targetPort"] = json!(port);
        }
        if !node_ports {
            if let Some(map) = p.as_object_mut() {
                map.remove("nodePort");
            }
            continue;
        }
        let np = match p["nodePort"].as_u64() {
            Some(np) => {
                if !cfg.node_ports.contains(&(np as u16)) || np > 65535 {
                    return Err(format!(
                        "spec.ports[{i}].nodePort: Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {}-{}",
                        cfg.node_ports.start(),
                        cfg.node_ports.end()
                    ));
                }
                if used_ports.contains(&np) || mine.contains(&np) {
                    return Err(format!("spec.ports[{i}].nodePort: Invalid value: {np}: provided port is already allocated"));
                }
                np
            }
            None => {
                let kept = old_ports
                    .iter()
                    .find(|o| {
                        o["port"] == p["port"]
                            && o["protocol"].as_str().unwrap_or("TCP") == p["protocol"]
                    })
                    .and_then(|o| o["nodePort"].as_u64())
                    .filter(|np| !mine.contains(np));
                match kept {
                    Some(np) => np,
                    None => (u64::from(*cfg.node_ports.start())..=u64::from(*cfg.node_ports.end()))
                        .find(|n| !used_ports.contains(n) && !mine.contains(n))
                        .ok_or_else(|| format!("spec.ports[{i}].nodePort: Internal error: range of node ports is full"))?,
                }
            }
        };
        mine.insert(np);
        p["nodePort"] = json!(np);
    }
    health_check_node_port(spec, &ty, old, &used_ports, &mine, cfg)
}

/// spec.healthCheckNodePort, as kube-apiserver allocates it: LoadBalancer Services with
/// externalTrafficPolicy Local get one from the node-port range (explicit when free, else the
/// one held before, else the first free one); others may not have one.
fn health_check_node_port(
    spec: &mut Value,
    ty: &str,
    old: Option<&Value>,
    used_ports: &HashSet<u64>,
    mine: &HashSet<u64>,
    cfg: &ServiceConfig,
) -> Result<(), String> {
    const FIELD: &str = "spec.healthCheckNodePort";
    let old_hc = old.and_then(|o| o["spec"]["healthCheckNodePort"].as_u64());
    let asked = spec["healthCheckNodePort"].as_u64().filter(|n| *n != 0);
    let needed = ty == "LoadBalancer" && spec["externalTrafficPolicy"] == "Local";
    if !needed {
        if asked.is_some() && asked != old_hc {
            return Err(format!(
                "{FIELD}: Invalid value: {}: may only be set when type is 'LoadBalancer' and externalTrafficPolicy is 'Local'",
                asked.unwrap_or_default()
            ));
        }
        if let Some(map) = spec.as_object_mut() {
            map.remove("healthCheckNodePort");
        }
        return Ok(());
    }
    let range = u64::from(*cfg.node_ports.start())..=u64::from(*cfg.node_ports.end());
    let np = match asked {
        Some(np) => {
            if !range.contains(&np) {
                return Err(format!(
                    "{FIELD}: Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {}-{}",
                    range.start(),
                    range.end()
                ));
            }
            if used_ports.contains(&np) || mine.contains(&np) {
                return Err(format!(
                    "{FIELD}: Invalid value: {np}: provided port is already allocated"
                ));
            }
            np
        }
        None => match old_hc.filter(|np| !mine.contains(np)) {
            Some(np) => np,
            None => range
                .clone()
                .find(|n| !used_ports.contains(n) && !mine.contains(n))
                .ok_or_else(|| format!("{FIELD}: Internal error: range of node ports is full"))?,
        },
    };
    spec["healthCheckNodePort"] = json!(np);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServiceConfig {
        ServiceConfig::default().with_cidr("10.96.0.0/24").unwrap()
    }

    #[test]
    fn defaults_and_dynamic_allocation() {
        let mut a = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}});
        prepare(&mut a, None, std::iter::empty(), &cfg()).unwrap();
        // /24: 254 usable, static band 16: the first dynamic address is .17.
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.17");
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.0.17"]));
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(a["spec"]["ports"][1]["nodePort"], 30001);
        assert_eq!(a["spec"]["sessionAffinity"], "None");
        let mut b = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        prepare(&mut b, None, [&a].into_iter(), &cfg()).unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.18");
        assert_eq!(b["spec"]["ports"][0]["nodePort"], 30002);
        let mut h = json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        prepare(&mut h, None, [&a].into_iter(), &cfg()).unwrap();
        assert_eq!(h["spec"]["clusterIP"], "None");
        assert!(h["spec"]["ports"][0].get("nodePort").is_none());
    }

    #[test]
    fn explicit_values_checked() {
        let mut a = json!({"spec": {"clusterIP": "10.96.0.10", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}});
        prepare(&mut a, None, std::iter::empty(), &cfg()).unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.10");
        let taken = prepare(
            &mut json!({"spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 1}]}}),
            None,
            [&a].into_iter(),
            &cfg(),
        )
        .unwrap_err();
        assert!(taken.contains("already allocated"), "{taken}");
        let out = prepare(
            &mut json!({"spec": {"clusterIP": "10.97.0.1", "ports": [{"port": 1}]}}),
            None,
            std::iter::empty(),
            &cfg(),
        )
        .unwrap_err();
        assert!(out.contains("not in the valid range"), "{out}");
        let np = prepare(
            &mut json!({"spec": {"type": "NodePort", "ports": [{"port": 1, "nodePort": 30080}]}}),
            None,
            [&a].into_iter(),
            &cfg(),
        )
        .unwrap_err();
        assert!(
            np.starts_with("spec.ports[0].nodePort") && np.contains("already allocated"),
            "{np}"
        );
        let np = prepare(
            &mut json!({"spec": {"type": "NodePort", "ports": [{"port": 1, "nodePort": 80}]}}),
            None,
            std::iter::empty(),
            &cfg(),
        )
        .unwrap_err();
        assert!(np.contains("30000-32767"), "{np}");
        assert!(prepare(
            &mut json!({"spec": {"type": "Bogus"}}),
            None,
            std::iter::empty(),
            &cfg()
        )
        .is_err());
        assert!(prepare(
            &mut json!({"spec": {"ports": [{"port": 0}]}}),
            None,
            std::iter::empty(),
            &cfg()
        )
        .is_err());
    }

    #[test]
    fn updates_keep_and_release() {
        let mut a = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        prepare(&mut a, None, std::iter::empty(), &cfg()).unwrap();
        // An update without clusterIP or nodePort keeps both.
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}});
        prepare(&mut b, Some(&a), std::iter::empty(), &cfg()).unwrap();
        assert_eq!(b["spec"]["clusterIP"], a["spec"]["clusterIP"]);
        assert_eq!(
            b["spec"]["ports"][0]["nodePort"],
            a["spec"]["ports"][0]["nodePort"]
        );
        assert_eq!(b["spec"]["ports"][1]["nodePort"], 30001);
        // Changing the cluster IP is refused; going back to ClusterIP drops node ports.
        let mut c = b.clone();
        c["spec"]["clusterIP"] = json!("10.96.0.99");
        assert!(prepare(&mut c, Some(&b), std::iter::empty(), &cfg())
            .unwrap_err()
            .contains("may not change"));
        let mut d = b.clone();
        d["spec"]["type"] = json!("ClusterIP");
        prepare(&mut d, Some(&b), std::iter::empty(), &cfg()).unwrap();
        assert!(d["spec"]["ports"][0].get("nodePort").is_none());
        assert!(ServiceConfig::default().with_cidr("10.0.0.0/40").is_err());
    }

    #[test]
    fn health_check_node_port_for_local_load_balancers() {
        let mut a = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                    "ports": [{"port": 80}]}});
        prepare(&mut a, None, std::iter::empty(), &cfg()).unwrap();
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(a["spec"]["healthCheckNodePort"], 30001);
        // Kept on update, taken from others, refused when taken, dropped with Cluster policy.
        let mut b = a.clone();
        b["spec"]
            .as_object_mut()
            .unwrap()
            .remove("healthCheckNodePort");
        prepare(&mut b, Some(&a), std::iter::empty(), &cfg()).unwrap();
        assert_eq!(b["spec"]["healthCheckNodePort"], 30001);
        let mut c = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                    "ports": [{"port": 80}], "healthCheckNodePort": 30001}});
        let e = prepare(&mut c, None, std::iter::once(&a), &cfg()).unwrap_err();
        assert!(
            e.starts_with("spec.healthCheckNodePort") && e.contains("already allocated"),
            "{e}"
        );
        let mut d = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        prepare(&mut d, None, std::iter::once(&a), &cfg()).unwrap();
        assert!(d["spec"].get("healthCheckNodePort").is_none());
        assert_ne!(d["spec"]["ports"][0]["nodePort"], 30001);
        let mut e = a.clone();
        e["spec"]["externalTrafficPolicy"] = json!("Cluster");
        prepare(&mut e, Some(&a), std::iter::empty(), &cfg()).unwrap();
        assert!(e["spec"].get("healthCheckNodePort").is_none());
        let mut f = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}], "healthCheckNodePort": 31000}});
        assert!(prepare(&mut f, None, std::iter::empty(), &cfg()).is_err());
        assert!(ServiceConfig::default().with_cidr("nope").is_err());
    }
}
