//! One conversion per kind: a typed Kubernetes object (from a manifest or, later, from the API)
//! checked as the API server would on the fields ferry uses, into ferry-model's types.
//! Problems go to the [`Ck`] with their field paths; the caller drops the object when there
//! are errors.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferry_model::cidr::Cidr;
use ferry_model::{
    AddressType, BfdProfileCr, BgpAdvertisementCr, BgpPeerCr, ClusterIpSpec, CommunityCr,
    ConfigMap, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, IpAddressPool, IpFamily,
    IpFamilyPolicy, L2Advertisement, Namespace, Node, NodeAddress, Protocol, Secret, SecretRef,
    Service, ServiceAllocation, ServiceExtra, ServicePort, ServiceType, SessionAffinity,
    TargetPort, TrafficPolicy,
};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::check::{
    is_config_key, is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name, join, label_selectors,
    meta, non_empty, quote, Ck, NameRule, Scope, DNS1123_LABEL, DNS1123_SUBDOMAIN, IANA_SVC_NAME,
};
use crate::metallb;

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

// ---------------------------------------------------------------------------------------------
// Service

pub fn service(ck: &mut Ck, svc: &core::Service) -> Service {
    let meta = meta(ck, &svc.metadata, Scope::Namespaced, NameRule::Dns1035Label);
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let type_ = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            ck.err(
                "spec.type",
                format!(
                    "must be ClusterIP, NodePort, LoadBalancer or ExternalName, got {}",
                    quote(other)
                ),
            );
            ServiceType::ClusterIP
        }
    };
    let (cluster_ip, secondary_cluster_ip) = service_cluster_ip(ck, spec, type_);
    let (ip_families, ip_family_policy) =
        ip_families(ck, spec, type_, &cluster_ip, secondary_cluster_ip);
    let headless = cluster_ip == ClusterIpSpec::None;
    let ports = service_ports(ck, spec, type_);
    let no_ports = spec.ports.as_ref().is_none_or(Vec::is_empty);
    if no_ports && !headless && type_ != ServiceType::ExternalName {
        ck.err(
            "spec.ports",
            "required: a Service needs at least one port unless it is headless \
             (clusterIP: None) or of type ExternalName",
        );
    }
    let selector = spec.selector.clone().unwrap_or_default();

    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(ip) = ck.unicast_ip(s, &format!("spec.externalIPs[{i}]")) {
            external_ips.push(ip);
        }
    }
    let load_balancer_ip = ck.opt_ip(spec.load_balancer_ip.as_deref(), "spec.loadBalancerIP");
    let load_balancer_class = non_empty(spec.load_balancer_class.as_deref()).map(str::to_string);
    if load_balancer_class.is_some() && type_ != ServiceType::LoadBalancer {
        ck.err(
            "spec.loadBalancerClass",
            "may only be set when type is LoadBalancer",
        );
    }
    let external_traffic_policy = match spec.external_traffic_policy.as_deref() {
        // "Global" is the old spelling of "Cluster".
        None | Some("") | Some("Cluster") | Some("Global") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            ck.err(
                "spec.externalTrafficPolicy",
                format!("must be Cluster or Local, got {}", quote(other)),
            );
            TrafficPolicy::Cluster
        }
    };
    let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            ck.err(
                "spec.internalTrafficPolicy",
                format!("must be Cluster or Local, got {}", quote(other)),
            );
            TrafficPolicy::Cluster
        }
    };
    let external_name = if type_ == ServiceType::ExternalName {
        let name = spec.external_name.as_deref().unwrap_or("");
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if trimmed.is_empty() {
            ck.err(
                "spec.externalName",
                "required for type ExternalName (a DNS name)",
            );
            None
        } else {
            if !is_dns1123_subdomain(trimmed) {
                ck.err(
                    "spec.externalName",
                    format!("{DNS1123_SUBDOMAIN}; got {}", quote(name)),
                );
            }
            Some(name.to_string())
        }
    } else {
        None
    };

    let mut load_balancer_ingress = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // ipMode Proxy: the load balancer itself delivers to the nodes, which must not
        // DNAT the address (KEP-1860).
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        let path = format!("status.loadBalancer.ingress[{i}].ip");
        if let Some(ip) = ck.opt_ip(ing.ip.as_deref(), &path) {
            load_balancer_ingress.push(ip);
        }
    }

    let session_affinity = session_affinity(ck, spec);
    let load_balancer_source_ranges = source_ranges(ck, spec, &meta, type_);
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => {
            let port = ck.port(n, "spec.healthCheckNodePort");
            if type_ != ServiceType::LoadBalancer || external_traffic_policy != TrafficPolicy::Local
            {
                ck.err(
                    "spec.healthCheckNodePort",
                    "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                );
            }
            port
        }
    };

    let prefer_close = match spec.traffic_distribution.as_deref() {
        None | Some("") => meta
            .extra
            .annotations
            .get("service.kubernetes.io/topology-mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("auto")),
        Some("PreferClose" | "PreferSameZone") => true,
        Some(other) => {
            ck.err(
                "spec.trafficDistribution",
                format!(
                    "supported values: \"PreferClose\", \"PreferSameZone\"; got {}",
                    quote(other)
                ),
            );
            false
        }
    };

    Service {
        meta,
        type_,
        cluster_ip,
        ip_families,
        ip_family_policy,
        ports,
        selector,
        external_traffic_policy,
        internal_traffic_policy,
        session_affinity,
        prefer_close,
        extra: ServiceExtra {
            secondary_cluster_ip,
            external_ips,
            load_balancer_ip,
            load_balancer_class,
            load_balancer_ingress,
            external_name,
            load_balancer_source_ranges,
            health_check_node_port,
        }
        .into(),
    }
}

/// spec.sessionAffinity and spec.sessionAffinityConfig.clientIP.timeoutSeconds, checked as the
/// API server checks them (the timeout defaults to 10800 and must be 1..=86400).
fn session_affinity(ck: &mut Ck, spec: &core::ServiceSpec) -> SessionAffinity {
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => {
            if timeout.is_some() {
                ck.err(
                    "spec.sessionAffinityConfig",
                    "must not be set when sessionAffinity is None",
                );
            }
            SessionAffinity::None
        }
        Some("ClientIP") => {
            let max = i64::from(SessionAffinity::MAX_TIMEOUT_SECONDS);
            let t = match timeout {
                None => SessionAffinity::DEFAULT_TIMEOUT_SECONDS,
                Some(t) => ck
                    .int_in(
                        i64::from(t),
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        1,
                        max,
                    )
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(SessionAffinity::DEFAULT_TIMEOUT_SECONDS),
            };
            SessionAffinity::ClientIp { timeout_seconds: t }
        }
        Some(other) => {
            ck.err(
                "spec.sessionAffinity",
                format!("must be None or ClientIP, got {}", quote(other)),
            );
            SessionAffinity::None
        }
    }
}

/// The annotation kube-proxy reads when spec.loadBalancerSourceRanges is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// spec.loadBalancerSourceRanges, or else the annotation (comma-separated), as kube-proxy's
/// `GetLoadBalancerSourceRanges` reads them; each a CIDR (spaces trimmed), and only on
/// LoadBalancer services, as the API server checks.
fn source_ranges(
    ck: &mut Ck,
    spec: &core::ServiceSpec,
    meta: &ferry_model::Meta,
    type_: ServiceType,
) -> Vec<Cidr> {
    let from_spec = spec.load_balancer_source_ranges.as_deref().unwrap_or(&[]);
    let (field, items): (String, Vec<(String, &str)>) = if !from_spec.is_empty() {
        (
            "spec.loadBalancerSourceRanges".into(),
            from_spec
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("spec.loadBalancerSourceRanges[{i}]"), v.as_str()))
                .collect(),
        )
    } else {
        let Some(v) = meta.extra.annotations.get(SOURCE_RANGES_ANNOTATION) else {
            return vec![];
        };
        let field = format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]");
        let items = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| (field.clone(), s))
            .collect();
        (field, items)
    };
    if items.is_empty() {
        return vec![];
    }
    if type_ != ServiceType::LoadBalancer {
        ck.err(field, "may only be used when type is LoadBalancer");
        return vec![];
    }
    let mut out = Vec::new();
    for (path, v) in items {
        match v.trim().parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => ck.err(
                path,
                format!(
                    "must be a CIDR such as 192.168.0.0/16 or fd00::/8, got {}: {}",
                    quote(v),
                    e.reason
                ),
            ),
        }
    }
    out
}

/// "" -> Auto, "None" -> headless, else an IP.
fn cluster_ip_value(s: &str) -> Option<ClusterIpSpec> {
    match s {
        "" => Some(ClusterIpSpec::Auto),
        "None" => Some(ClusterIpSpec::None),
        _ => s.parse().ok().map(ClusterIpSpec::Ip),
    }
}

const CLUSTER_IP_FORMS: &str = "must be an IP address, \"None\" (headless) or empty";

/// spec.clusterIP and spec.clusterIPs: the primary cluster IP and the other family's, if given.
fn service_cluster_ip(
    ck: &mut Ck,
    spec: &core::ServiceSpec,
    type_: ServiceType,
) -> (ClusterIpSpec, Option<IpAddr>) {
    let single = match spec.cluster_ip.as_deref() {
        None => None,
        Some(s) => match cluster_ip_value(s) {
            Some(c) => Some(c),
            None => {
                ck.err(
                    "spec.clusterIP",
                    format!("{CLUSTER_IP_FORMS}, got {}", quote(s)),
                );
                return (ClusterIpSpec::Auto, None);
            }
        },
    };
    let mut list = Vec::new();
    let entries = spec.cluster_ips.as_deref().unwrap_or(&[]);
    for (i, s) in entries.iter().enumerate() {
        let path = format!("spec.clusterIPs[{i}]");
        match cluster_ip_value(s) {
            Some(ClusterIpSpec::Auto) | None => {
                ck.err(
                    path,
                    format!(
                        "must be an IP address or \"None\" (headless), got {}",
                        quote(s)
                    ),
                );
            }
            Some(c) => list.push(c),
        }
    }
    if entries.len() > 2 {
        ck.err(
            "spec.clusterIPs",
            format!(
                "at most two entries (one per IP family), got {}",
                entries.len()
            ),
        );
    } else if let [first, second] = list.as_slice() {
        match (first, second) {
            (ClusterIpSpec::Ip(a), ClusterIpSpec::Ip(b)) if a.is_ipv4() == b.is_ipv4() => {
                ck.err(
                    "spec.clusterIPs[1]",
                    format!("must be of the other IP family than spec.clusterIPs[0] ({a})"),
                );
            }
            (ClusterIpSpec::Ip(_), ClusterIpSpec::Ip(_)) => {}
            _ => ck.err(
                "spec.clusterIPs",
                "\"None\" (headless) must be the only entry",
            ),
        }
    }
    let (result, field) = match (single, list.first()) {
        (Some(s), Some(first)) if s != ClusterIpSpec::Auto => {
            if s != *first {
                ck.err(
                    "spec.clusterIPs[0]",
                    format!("must be equal to spec.clusterIP ({})", show_cluster_ip(&s)),
                );
            }
            (s, "spec.clusterIP")
        }
        (_, Some(first)) => (first.clone(), "spec.clusterIPs"),
        (Some(s), None) => (s, "spec.clusterIP"),
        (None, None) => (ClusterIpSpec::Auto, "spec.clusterIP"),
    };
    match (type_, &result) {
        (ServiceType::NodePort | ServiceType::LoadBalancer, ClusterIpSpec::None) => ck.err(
            field,
            format!("may not be \"None\" (headless) for type {}", type_.as_k8s()),
        ),
        (ServiceType::ExternalName, ClusterIpSpec::None | ClusterIpSpec::Ip(_)) => {
            ck.err(field, "may not be set for type ExternalName")
        }
        _ => {}
    }
    let secondary = match list.as_slice() {
        [ClusterIpSpec::Ip(a), ClusterIpSpec::Ip(b)] if a.is_ipv4() != b.is_ipv4() => Some(*b),
        _ => None,
    };
    (result, secondary)
}

/// spec.ipFamilies and spec.ipFamilyPolicy, checked as the API server checks them: at most two
/// distinct families, matching the cluster IPs given (clusterIPs[i] is of ipFamilies[i]), and
/// SingleStack with one family only.
fn ip_families(
    ck: &mut Ck,
    spec: &core::ServiceSpec,
    type_: ServiceType,
    cluster_ip: &ClusterIpSpec,
    secondary: Option<IpAddr>,
) -> (Vec<IpFamily>, Option<IpFamilyPolicy>) {
    let policy = match non_empty(spec.ip_family_policy.as_deref()) {
        None => None,
        Some(s) => match IpFamilyPolicy::parse_k8s(s) {
            Some(p) => Some(p),
            None => {
                ck.err(
                    "spec.ipFamilyPolicy",
                    format!(
                        "must be SingleStack, PreferDualStack or RequireDualStack, got {}",
                        quote(s)
                    ),
                );
                None
            }
        },
    };
    let mut families = Vec::new();
    let entries = spec.ip_families.as_deref().unwrap_or(&[]);
    for (i, s) in entries.iter().enumerate() {
        let path = format!("spec.ipFamilies[{i}]");
        match IpFamily::parse_k8s(s) {
            Some(f) if families.contains(&f) => {
                ck.err(path, format!("{s} is listed twice"));
            }
            Some(f) => families.push(f),
            None => ck.err(path, format!("must be IPv4 or IPv6, got {}", quote(s))),
        }
    }
    if entries.len() > 2 {
        ck.err(
            "spec.ipFamilies",
            format!(
                "at most two entries (one per IP family), got {}",
                entries.len()
            ),
        );
    }
    if type_ == ServiceType::ExternalName {
        if policy.is_some() {
            ck.err(
                "spec.ipFamilyPolicy",
                "must not be set for type ExternalName",
            );
        }
        if !entries.is_empty() {
            ck.err("spec.ipFamilies", "must not be set for type ExternalName");
        }
        return (Vec::new(), None);
    }
    // The cluster IPs given must be of the families listed, in order.
    let ips: Vec<IpAddr> = match cluster_ip {
        ClusterIpSpec::Ip(ip) => std::iter::once(*ip).chain(secondary).collect(),
        _ => Vec::new(),
    };
    for (i, (ip, f)) in ips.iter().zip(&families).enumerate() {
        if IpFamily::of(*ip) != *f {
            ck.err(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} is not of spec.ipFamilies[{i}] ({})", f.as_k8s()),
            );
        }
    }
    if policy == Some(IpFamilyPolicy::SingleStack) {
        if families.len() > 1 {
            ck.err(
                "spec.ipFamilies",
                "may hold one family only when spec.ipFamilyPolicy is SingleStack",
            );
        }
        if ips.len() > 1 {
            ck.err(
                "spec.clusterIPs",
                "may hold one address only when spec.ipFamilyPolicy is SingleStack",
            );
        }
    }
    (families, policy)
}

fn show_cluster_ip(c: &ClusterIpSpec) -> String {
    match c {
        ClusterIpSpec::Auto => "\"\"".to_string(),
        ClusterIpSpec::None => "\"None\"".to_string(),
        ClusterIpSpec::Ip(ip) => ip.to_string(),
    }
}

/// spec.ports.
fn service_ports(ck: &mut Ck, spec: &core::ServiceSpec, type_: ServiceType) -> Vec<ServicePort> {
    let items = spec.ports.as_deref().unwrap_or(&[]);
    let many = items.len() > 1;
    // Sized up front: kept with the Service (a pushed-to Vec has room for four).
    let mut ports = Vec::with_capacity(items.len());
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seen: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    let mut node_ports: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    for (i, m) in items.iter().enumerate() {
        let base = format!("spec.ports[{i}]");
        let name = m.name.as_deref().unwrap_or("");
        if name.is_empty() {
            if many {
                ck.err(
                    join(&base, "name"),
                    "required when the Service has more than one port",
                );
            }
        } else if !is_dns1123_label(name) {
            ck.err(
                join(&base, "name"),
                format!("{DNS1123_LABEL}; got {}", quote(name)),
            );
        } else if let Some(j) = names.insert(name, i) {
            ck.err(
                join(&base, "name"),
                format!("duplicate port name {} (also spec.ports[{j}])", quote(name)),
            );
        }
        let protocol = ck.protocol(m.protocol.as_deref(), &join(&base, "protocol"));
        let port = ck.port(m.port, &join(&base, "port"));
        let target_port = match &m.target_port {
            None => None,
            Some(IntOrString::String(s)) if s.is_empty() => None,
            Some(IntOrString::String(s)) => {
                if is_iana_svc_name(s) {
                    Some(TargetPort::Name(s.clone()))
                } else {
                    ck.err(
                        join(&base, "targetPort"),
                        format!("{IANA_SVC_NAME}; got {}", quote(s)),
                    );
                    None
                }
            }
            Some(IntOrString::Int(n)) => {
                match ck.int_in(i64::from(*n), &join(&base, "targetPort"), 0, 65535) {
                    Some(0) | None => None,
                    Some(n) => u16::try_from(n).ok().map(TargetPort::Number),
                }
            }
        };
        let node_port = m
            .node_port
            .and_then(|n| ck.int_in(i64::from(n), &join(&base, "nodePort"), 0, 65535))
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0);
        if let Some(np) = node_port {
            if type_ == ServiceType::ClusterIP {
                ck.err(
                    join(&base, "nodePort"),
                    "may not be set when type is ClusterIP",
                );
            } else if let Some(j) = node_ports.insert((np, protocol), i) {
                ck.err(
                    join(&base, "nodePort"),
                    format!(
                        "duplicate node port {np}/{} (also spec.ports[{j}])",
                        protocol.as_k8s()
                    ),
                );
            }
        }
        let Some(port) = port else {
            continue;
        };
        if let Some(j) = seen.insert((port, protocol), i) {
            ck.err(
                &base,
                format!(
                    "duplicate port {port}/{} (also spec.ports[{j}])",
                    protocol.as_k8s()
                ),
            );
        }
        ports.push(ServicePort {
            name: name.to_string(),
            protocol,
            port,
            target_port: target_port.unwrap_or(TargetPort::Number(port)),
            node_port,
        });
    }
    ports
}

// ---------------------------------------------------------------------------------------------
// EndpointSlice and Endpoints

pub fn endpoint_slice(ck: &mut Ck, slice: &discovery::EndpointSlice) -> EndpointSlice {
    let mut meta = meta(
        ck,
        &slice.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let service_name = match meta.labels.get(SERVICE_NAME_LABEL) {
        Some(s) if !s.is_empty() => s.clone(),
        _ => {
            ck.err(
                "metadata.labels",
                format!("the label {SERVICE_NAME_LABEL} (the Service's name) is required"),
            );
            String::new()
        }
    };
    // Nothing reads a slice's labels past its service's name (in `service_name`): not kept (a
    // map of one label costs ~700 bytes, for each of 10,000 slices).
    meta.labels = BTreeMap::new();
    let address_type = match ck.required(&slice.address_type, "addressType") {
        Some("IPv4") => Some(AddressType::IPv4),
        Some("IPv6") => Some(AddressType::IPv6),
        Some("FQDN") => Some(AddressType::Fqdn),
        Some(other) => {
            ck.err(
                "addressType",
                format!("must be IPv4, IPv6 or FQDN, got {}", quote(other)),
            );
            None
        }
        None => None,
    };

    // Sized up front: kept for as long as the file is unchanged (10,000 slices of 10).
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, m) in slice.endpoints.iter().enumerate() {
        let base = format!("endpoints[{i}]");
        let addresses_path = join(&base, "addresses");
        if m.addresses.is_empty() {
            ck.err(&addresses_path, "required: at least one address");
        }
        let mut addresses = ferry_model::Addresses::new();
        for (j, s) in m.addresses.iter().enumerate() {
            let path = format!("{addresses_path}[{j}]");
            match address_type {
                Some(AddressType::Fqdn) if !is_dns1123_subdomain(s) => {
                    ck.err(path, format!("{DNS1123_SUBDOMAIN}; got {}", quote(s)));
                }
                Some(AddressType::Fqdn) | None => {}
                Some(family) => match s.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv4() == (family == AddressType::IPv4) => addresses.push(ip),
                    Ok(_) | Err(_) => {
                        let want = if family == AddressType::IPv4 {
                            "an IPv4"
                        } else {
                            "an IPv6"
                        };
                        ck.err(
                            path,
                            format!("must be {want} address (addressType), got {}", quote(s)),
                        );
                    }
                },
            }
        }
        let conditions = match &m.conditions {
            Some(c) => {
                let terminating = c.terminating.unwrap_or(false);
                let ready = c.ready.unwrap_or(!terminating);
                EndpointConditions {
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating,
                }
            }
            None => EndpointConditions {
                ready: true,
                serving: true,
                terminating: false,
            },
        };
        // Topology hints: the zones to serve (an empty name is refused, as the API server does).
        let zone_hints = m
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|zones| {
                let mut out = Vec::with_capacity(zones.len());
                for (j, z) in zones.iter().enumerate() {
                    let path = format!("{base}.hints.forZones[{j}].name");
                    if z.name.is_empty() {
                        ck.err(path, "required: a zone name");
                    } else {
                        out.push(z.name.clone());
                    }
                }
                ferry_model::ZoneHints::new(out)
            });
        endpoints.push(Endpoint {
            addresses,
            conditions,
            node_name: non_empty(m.node_name.as_deref()).map(ferry_model::node_name),
            zone_hints,
        });
    }
    if address_type == Some(AddressType::Fqdn) && !endpoints.is_empty() {
        ck.warn(
            "addressType",
            "FQDN EndpointSlice: ferry only routes to IP addresses; endpoint addresses ignored",
        );
    }

    // Sized up front: kept with the slice (a pushed-to Vec has room for four).
    let mut ports = Vec::with_capacity(slice.ports.as_ref().map_or(0, Vec::len));
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, m) in slice.ports.iter().flatten().enumerate() {
        let base = format!("ports[{i}]");
        let name = m.name.clone().unwrap_or_default();
        check_port_name(ck, &base, "ports", &name, i, &mut names);
        let protocol = ck.protocol(m.protocol.as_deref(), &join(&base, "protocol"));
        let Some(port) = m.port else {
            ck.warn(
                join(&base, "port"),
                "no port number: Kubernetes reads this as \"all ports\", which ferry does not \
                 support; port entry ignored",
            );
            continue;
        };
        if let Some(port) = ck
            .int_in(i64::from(port), &join(&base, "port"), 1, 65535)
            .and_then(|n| u16::try_from(n).ok())
        {
            ports.push(EndpointPort {
                name,
                protocol,
                port,
            });
        }
    }

    EndpointSlice {
        meta,
        service_name,
        address_type: address_type.unwrap_or(AddressType::IPv4),
        endpoints,
        ports,
    }
}

/// v1 Endpoints: one EndpointSlice per subset (two if it mixes IP families), see the
/// [`crate::manifest`] documentation.
#[allow(deprecated)] // Endpoints is deprecated in Kubernetes 1.33; files still hold them.
pub fn endpoints(ck: &mut Ck, eps: &core::Endpoints) -> Vec<EndpointSlice> {
    let meta = meta(
        ck,
        &eps.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let mut slices = Vec::new();
    for (i, subset) in eps.subsets.iter().flatten().enumerate() {
        let base = format!("subsets[{i}]");
        let mut endpoints = Vec::new();
        for (key, ready, list) in [
            ("addresses", true, &subset.addresses),
            ("notReadyAddresses", false, &subset.not_ready_addresses),
        ] {
            for (j, a) in list.iter().flatten().enumerate() {
                let path = format!("{base}.{key}[{j}]");
                let ip = ck
                    .required(&a.ip, &join(&path, "ip"))
                    .and_then(|s| ck.ip(s, &join(&path, "ip")));
                if let Some(ip) = ip {
                    endpoints.push(Endpoint {
                        addresses: ip.into(),
                        conditions: EndpointConditions {
                            ready,
                            serving: ready,
                            terminating: false,
                        },
                        node_name: non_empty(a.node_name.as_deref()).map(ferry_model::node_name),
                        zone_hints: None,
                    });
                }
            }
        }
        let mut ports = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (j, p) in subset.ports.iter().flatten().enumerate() {
            let path = format!("{base}.ports[{j}]");
            let name = p.name.clone().unwrap_or_default();
            check_port_name(ck, &path, &format!("{base}.ports"), &name, j, &mut names);
            let protocol = ck.protocol(p.protocol.as_deref(), &join(&path, "protocol"));
            if let Some(port) = ck.port(p.port, &join(&path, "port")) {
                ports.push(EndpointPort {
                    name,
                    protocol,
                    port,
                });
            }
        }

        let (v4, v6): (Vec<Endpoint>, Vec<Endpoint>) = endpoints
            .into_iter()
            .partition(|e| e.addresses.iter().all(IpAddr::is_ipv4));
        let split = !v4.is_empty() && !v6.is_empty();
        for (family, eps, suffix) in [
            (AddressType::IPv4, v4, "-ipv4"),
            (AddressType::IPv6, v6, "-ipv6"),
        ] {
            if eps.is_empty() {
                continue;
            }
            let mut slice_meta = meta.clone();
            slice_meta.name = format!("{}-{i}{}", meta.name, if split { suffix } else { "" });
            if slice_meta.extra.uid.is_some() {
                slice_meta.extra.uid = None;
            }
            slice_meta
                .labels
                .insert(SERVICE_NAME_LABEL.to_string(), meta.name.clone());
            slices.push(EndpointSlice {
                meta: slice_meta,
                service_name: meta.name.clone(),
                address_type: family,
                endpoints: eps,
                ports: ports.clone(),
            });
        }
    }
    slices
}

// ---------------------------------------------------------------------------------------------
// Node, ConfigMap, Namespace

pub fn node(ck: &mut Ck, node: &core::Node) -> Node {
    let meta = meta(
        ck,
        &node.metadata,
        Scope::Cluster,
        NameRule::Dns1123Subdomain,
    );
    let mut addresses = Vec::new();
    let list = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in list.into_iter().flatten().enumerate() {
        let base = format!("status.addresses[{i}]");
        let type_ = ck.required(&a.type_, &join(&base, "type"));
        let address = ck.required(&a.address, &join(&base, "address"));
        if let (Some(type_), Some(address)) = (type_, address) {
            addresses.push(NodeAddress {
                type_: type_.to_string(),
                address: address.to_string(),
            });
        }
    }
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = &node.spec {
        let single = non_empty(spec.pod_cidr.as_deref());
        if let Some(s) = single {
            if let Err(e) = s.parse::<Cidr>() {
                ck.err("spec.podCIDR", format!("must be a CIDR: {e}"));
            }
        }
        for (i, s) in spec.pod_cidrs.iter().flatten().enumerate() {
            let path = format!("spec.podCIDRs[{i}]");
            if let Err(e) = s.parse::<Cidr>() {
                ck.err(&path, format!("must be a CIDR: {e}"));
            } else if i == 0 && single.is_some_and(|p| p != s) {
                ck.err(&path, "must be equal to spec.podCIDR");
            }
            pod_cidrs.push(s.to_string());
        }
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(single.map(str::to_string));
        }
    }
    Node {
        meta,
        addresses,
        pod_cidrs,
    }
}

pub fn config_map(ck: &mut Ck, cm: &core::ConfigMap) -> ConfigMap {
    let meta = meta(
        ck,
        &cm.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let data = cm.data.clone().unwrap_or_default();
    for key in data.keys() {
        if !is_config_key(key) {
            ck.err(
                format!("data[{key}]"),
                "keys must consist of letters, digits, '-', '_' or '.'",
            );
        }
    }
    ConfigMap { meta, data }
}

pub fn namespace(ck: &mut Ck, ns: &core::Namespace) -> Namespace {
    Namespace {
        meta: meta(ck, &ns.metadata, Scope::Cluster, NameRule::Dns1123Label),
    }
}

// ---------------------------------------------------------------------------------------------
// MetalLB

pub fn ip_address_pool(ck: &mut Ck, pool: &metallb::IPAddressPool) -> IpAddressPool {
    let meta = meta(
        ck,
        &pool.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let spec = &pool.spec;
    let entries = spec.addresses.as_deref().unwrap_or(&[]);
    if entries.is_empty() {
        ck.err("spec.addresses", "required: at least one CIDR or IP range");
    }
    let mut addresses = Vec::new();
    for (i, a) in entries.iter().enumerate() {
        if let Err(e) = ferry_model::pools::parse_address_entry(a) {
            ck.err(format!("spec.addresses[{i}]"), e);
        }
        addresses.push(a.clone());
    }
    let service_allocation = spec.service_allocation.as_ref().map(|sa| {
        let base = "spec.serviceAllocation";
        let priority = sa
            .priority
            .and_then(|n| {
                ck.int_in(
                    i64::from(n),
                    &join(base, "priority"),
                    0,
                    i64::from(i32::MAX),
                )
            })
            .and_then(|n| i32::try_from(n).ok());
        let mut namespaces = Vec::new();
        for (i, ns) in sa.namespaces.iter().flatten().enumerate() {
            if !is_dns1123_label(ns) {
                ck.err(
                    format!("{base}.namespaces[{i}]"),
                    format!("{DNS1123_LABEL}; got {}", quote(ns)),
                );
            }
            namespaces.push(ns.clone());
        }
        ServiceAllocation {
            priority,
            namespaces,
            namespace_selectors: label_selectors(
                ck,
                sa.namespace_selectors.as_ref(),
                &join(base, "namespaceSelectors"),
            ),
            service_selectors: label_selectors(
                ck,
                sa.service_selectors.as_ref(),
                &join(base, "serviceSelectors"),
            ),
        }
    });
    IpAddressPool {
        meta,
        addresses,
        auto_assign: spec.auto_assign.unwrap_or(true),
        avoid_buggy_ips: spec.avoid_buggy_ips.unwrap_or(false),
        service_allocation,
    }
}

pub fn l2_advertisement(ck: &mut Ck, l2: &metallb::L2Advertisement) -> L2Advertisement {
    let meta = meta(
        ck,
        &l2.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let spec = l2.spec.clone().unwrap_or_default();
    L2Advertisement {
        meta,
        ip_address_pools: spec.ip_address_pools.unwrap_or_default(),
        ip_address_pool_selectors: label_selectors(
            ck,
            spec.ip_address_pool_selectors.as_ref(),
            "spec.ipAddressPoolSelectors",
        ),
        node_selectors: label_selectors(ck, spec.node_selectors.as_ref(), "spec.nodeSelectors"),
        interfaces: spec.interfaces.unwrap_or_default(),
    }
}

/// A non-negative integer of a MetalLB CRD (its schema's `minimum: 0`); the model checks the
/// kind's own range.
fn non_negative(ck: &mut Ck, v: Option<i64>, path: &str) -> Option<u64> {
    let n = v?;
    match u64::try_from(n) {
        Ok(n) => Some(n),
        Err(_) => {
            ck.err(path, format!("must not be negative, got {n}"));
            None
        }
    }
}

/// A BGPPeer (`metallb.io/v1beta2` or `v1beta1`). MetalLB's FRR-only fields are refused
/// (`interface`, `dynamicASN`, `localASN`: the session could not be what the user asked for)
/// or ignored with a warning (`connectTime`, `enableGracefulRestart`, `disableMP`,
/// `dualStackAddressFamily`).
pub fn bgp_peer(ck: &mut Ck, p: &metallb::BGPPeer) -> BgpPeerCr {
    let meta = meta(
        ck,
        &p.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let spec = p.spec.clone().unwrap_or_default();
    if non_empty(spec.interface.as_deref()).is_some() {
        ck.err(
            "spec.interface",
            "unnumbered BGP peering over an interface is not supported by ferry: set peerAddress",
        );
    }
    if non_empty(spec.dynamic_asn.as_deref()).is_some() {
        ck.err(
            "spec.dynamicASN",
            "not supported by ferry: set peerASN to the router's AS number",
        );
    }
    if spec.local_asn.is_some_and(|n| n != 0) {
        ck.err(
            "spec.localASN",
            "not supported by ferry (local-as): set myASN to the AS number the router expects",
        );
    }
    if non_empty(spec.connect_time.as_deref()).is_some() {
        ck.warn(
            "spec.connectTime",
            "ignored: ferry's speaker retries connections on its own schedule",
        );
    }
    for (set, field) in [
        (spec.enable_graceful_restart, "spec.enableGracefulRestart"),
        (spec.disable_mp, "spec.disableMP"),
        (
            spec.dual_stack_address_family,
            "spec.dualStackAddressFamily",
        ),
    ] {
        if set == Some(true) {
            ck.warn(field, "ignored: a setting of MetalLB's FRR modes");
        }
    }
    let my_asn = non_negative(ck, spec.my_asn, "spec.myASN");
    let peer_asn = non_negative(ck, spec.peer_asn, "spec.peerASN");
    let peer_port = non_negative(ck, spec.peer_port, "spec.peerPort");
    BgpPeerCr {
        meta,
        my_asn,
        peer_asn,
        peer_address: spec.peer_address.unwrap_or_default(),
        peer_port,
        hold_time: spec.hold_time,
        keepalive_time: spec.keepalive_time,
        router_id: spec.router_id.unwrap_or_default(),
        source_address: spec.source_address.unwrap_or_default(),
        node_selectors: label_selectors(ck, spec.node_selectors.as_ref(), "spec.nodeSelectors"),
        password: spec.password.unwrap_or_default(),
        password_secret: spec
            .password_secret
            .filter(|r| r.name.as_deref().is_some_and(|n| !n.is_empty()))
            .map(|r| SecretRef {
                name: r.name.unwrap_or_default(),
                namespace: r.namespace.unwrap_or_default(),
            }),
        ebgp_multihop: spec.ebgp_multi_hop.unwrap_or(false),
        bfd_profile: spec.bfd_profile.unwrap_or_default(),
        vrf: spec.vrf.unwrap_or_default(),
    }
}

pub fn bgp_advertisement(ck: &mut Ck, a: &metallb::BGPAdvertisement) -> BgpAdvertisementCr {
    let meta = meta(
        ck,
        &a.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let spec = a.spec.clone().unwrap_or_default();
    if spec
        .service_selectors
        .as_ref()
        .is_some_and(|s| !s.is_empty())
    {
        ck.err(
            "spec.serviceSelectors",
            "not supported by ferry yet: announce the services' pools instead (ipAddressPools)",
        );
    }
    let local_pref = non_negative(ck, spec.local_pref, "spec.localPref");
    BgpAdvertisementCr {
        meta,
        aggregation_length: spec.aggregation_length,
        aggregation_length_v6: spec.aggregation_length_v6,
        local_pref,
        communities: spec.communities.unwrap_or_default(),
        ip_address_pools: spec.ip_address_pools.unwrap_or_default(),
        ip_address_pool_selectors: label_selectors(
            ck,
            spec.ip_address_pool_selectors.as_ref(),
            "spec.ipAddressPoolSelectors",
        ),
        peers: spec.peers.unwrap_or_default(),
        node_selectors: label_selectors(ck, spec.node_selectors.as_ref(), "spec.nodeSelectors"),
    }
}

pub fn community(ck: &mut Ck, c: &metallb::Community) -> CommunityCr {
    let meta = meta(
        ck,
        &c.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let communities = c
        .spec
        .iter()
        .flat_map(|s| s.communities.iter().flatten())
        .map(|a| {
            (
                a.name.clone().unwrap_or_default(),
                a.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    CommunityCr { meta, communities }
}

pub fn bfd_profile(ck: &mut Ck, b: &metallb::BFDProfile) -> BfdProfileCr {
    let meta = meta(
        ck,
        &b.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let spec = b.spec.clone().unwrap_or_default();
    BfdProfileCr {
        meta,
        receive_interval: non_negative(ck, spec.receive_interval, "spec.receiveInterval"),
        transmit_interval: non_negative(ck, spec.transmit_interval, "spec.transmitInterval"),
        detect_multiplier: non_negative(ck, spec.detect_multiplier, "spec.detectMultiplier"),
        echo_interval: non_negative(ck, spec.echo_interval, "spec.echoInterval"),
        echo_mode: spec.echo_mode,
        passive_mode: spec.passive_mode,
        minimum_ttl: non_negative(ck, spec.minimum_ttl, "spec.minimumTtl"),
    }
}

/// A Secret: metadata, type and data (`stringData` over `data`, as the API server merges
/// them). Only BGPPeers' passwordSecret reads them.
pub fn secret(ck: &mut Ck, s: &core::Secret) -> Secret {
    let meta = meta(
        ck,
        &s.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    for (k, v) in s.string_data.iter().flatten() {
        data.insert(k.clone(), v.as_bytes().to_vec());
    }
    for key in data.keys() {
        if !is_config_key(key) {
            ck.err(
                format!("data[{key}]"),
                "keys must consist of letters, digits, '-', '_' or '.'",
            );
        }
    }
    Secret {
        meta,
        type_: non_empty(s.type_.as_deref())
            .unwrap_or("Opaque")
            .to_string(),
        data,
    }
}

/// An endpoint port's name at `path` (the `index`-th of `list`): a DNS-1123 label or empty,
/// and not used twice in one list (`seen` holds the names so far).
fn check_port_name(
    ck: &mut Ck,
    path: &str,
    list: &str,
    name: &str,
    index: usize,
    seen: &mut BTreeMap<String, usize>,
) {
    if !name.is_empty() && !is_dns1123_label(name) {
        ck.err(
            join(path, "name"),
            format!("{DNS1123_LABEL}; got {}", quote(name)),
        );
    }
    if let Some(first) = seen.insert(name.to_string(), index) {
        ck.err(
            join(path, "name"),
            format!("duplicate port name {} (also {list}[{first}])", quote(name)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_text;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A Service as a Kubernetes API client hands it over (no YAML involved).
    fn api_service(ports: Vec<core::ServicePort>) -> core::Service {
        core::Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(core::ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(ports),
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ..core::ServiceSpec::default()
            }),
            ..core::Service::default()
        }
    }

    #[test]
    fn typed_objects_convert_without_yaml() {
        let svc = api_service(vec![core::ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: Some(IntOrString::String("http".into())),
            ..core::ServicePort::default()
        }]);
        let mut ck = Ck::default();
        let s = service(&mut ck, &svc);
        assert!(ck.errors.is_empty(), "{:?}", ck.errors);
        assert_eq!(s.meta.object_ref().to_string(), "shop/web");
        assert_eq!(s.type_, ServiceType::LoadBalancer);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.selector["app"], "web");

        // The same checks as for a file: a port the API server would refuse.
        let svc = api_service(vec![core::ServicePort {
            port: 70000,
            ..core::ServicePort::default()
        }]);
        let mut ck = Ck::default();
        service(&mut ck, &svc);
        assert_eq!(
            ck.errors,
            [(
                "spec.ports[0].port".to_string(),
                "must be between 1 and 65535, got 70000".to_string()
            )]
        );
    }

    #[test]
    fn a_manifest_and_its_typed_object_give_the_same_service() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  type: LoadBalancer\n  selector: {app: web}\n  ports:\n  \
                    - {name: http, port: 80, targetPort: http}\n";
        let p = parse_text("f", text);
        let svc = api_service(vec![core::ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: Some(IntOrString::String("http".into())),
            ..core::ServicePort::default()
        }]);
        let mut ck = Ck::default();
        assert_eq!(
            p.objects,
            [ferry_model::Object::Service(service(&mut ck, &svc))]
        );
    }

    #[test]
    fn what_a_manifest_leaves_out_takes_no_box() {
        // 10,000 Services and slices are kept: the rarely-set fields are boxed only when set.
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n\
                    ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
                    labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n\
                    - addresses: [10.42.0.5]\n  nodeName: n1\nports: [{port: 80}]\n";
        let p = parse_text("f", text);
        assert!(p.errors.is_empty(), "{p:#?}");
        let [ferry_model::Object::Service(s), ferry_model::Object::EndpointSlice(sl)] =
            p.objects.as_slice()
        else {
            panic!("{p:#?}")
        };
        assert!(s.extra.is_absent() && s.meta.extra.is_absent());
        assert!(sl.meta.extra.is_absent());
        assert_eq!(s.ports.capacity(), 1);
        assert_eq!(sl.ports.capacity(), 1);
        assert!(!sl.endpoints[0].addresses.spilled());
        assert_eq!(sl.endpoints[0].node_name.as_deref(), Some("n1"));
        // Set: boxed, and read back.
        let p = parse_text(
            "f",
            &text.replace(
                "metadata: {name: web}\nspec:",
                "metadata: {name: web, resourceVersion: \"9\"}\nspec:\n  externalIPs: [192.0.2.9]",
            ),
        );
        let Some(ferry_model::Object::Service(s)) = p.objects.first() else {
            panic!("{p:#?}")
        };
        assert_eq!(s.meta.extra.resource_version.as_deref(), Some("9"));
        assert_eq!(s.extra.external_ips, [IpAddr::from([192, 0, 2, 9])]);
    }

    #[test]
    fn traffic_distribution_and_zone_hints() {
        let svc = |extra: &str| {
            parse_text(
                "f",
                &format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: web{extra}}}\nspec:\n  ports: [{{port: 80}}]\n"
                ),
            )
        };
        let close = |p: &crate::manifest::Parsed| match p.objects.first() {
            Some(ferry_model::Object::Service(s)) => s.prefer_close,
            other => panic!("{other:?}"),
        };
        assert!(!close(&svc("")));
        let p = svc(", annotations: {service.kubernetes.io/topology-mode: Auto}");
        assert!(close(&p));
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n  trafficDistribution: PreferClose\n";
        assert!(close(&parse_text("f", text)));
        let p = parse_text("f", &text.replace("PreferClose", "Anywhere"));
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert_eq!(p.errors[0].at.field, "spec.trafficDistribution");

        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n- addresses: [10.42.0.5]\n  zone: a\n  hints: {forZones: [{name: a}, {name: b}]}\n- addresses: [10.42.0.6]\nports: [{port: 80}]\n";
        let p = parse_text("f", slice);
        assert!(p.errors.is_empty(), "{p:#?}");
        let Some(ferry_model::Object::EndpointSlice(s)) = p.objects.first() else {
            panic!("{p:#?}");
        };
        assert_eq!(
            s.endpoints[0].zone_hints,
            Some(vec!["a".to_string(), "b".to_string()].into())
        );
        assert_eq!(s.endpoints[1].zone_hints, None);
        let p = parse_text("f", &slice.replace("{name: b}", "{name: ''}"));
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert_eq!(p.errors[0].at.field, "endpoints[0].hints.forZones[1].name");
    }

    #[test]
    fn fields_ferry_does_not_use_are_checked_by_type_and_unknown_fields_ignored() {
        let base =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";
        // An unknown field is ignored, as the API server does without strict field validation.
        let p = parse_text("f", &format!("{base}  frobnicate: [1, 2]\n"));
        assert!(p.errors.is_empty(), "{p:#?}");
        // A known field of the wrong type is refused even if ferry does not use it.
        let p = parse_text("f", &format!("{base}  sessionAffinity: [ClientIP]\n"));
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert_eq!(p.errors[0].at.field, "spec.sessionAffinity");
        assert_eq!(p.errors[0].message, "must be a string, got a list");
        let p = parse_text(
            "f",
            &format!("{base}  allocateLoadBalancerNodePorts: maybe\n"),
        );
        assert_eq!(p.errors[0].at.field, "spec.allocateLoadBalancerNodePorts");
        assert!(p.errors[0].message.starts_with("must be true or false"));
        // A timestamp must be one.
        let p = parse_text(
            "f",
            &base.replace("{name: web}", "{name: web, creationTimestamp: yesterday}"),
        );
        assert_eq!(p.errors[0].at.field, "metadata.creationTimestamp", "{p:#?}");
        assert!(p.errors[0].message.starts_with("must be an RFC 3339 time"));
    }

    #[test]
    fn null_labels_are_empty_strings() {
        let text =
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, labels: {a: null, b: ~}}\n\
                    data: {k: v}\n";
        let p = parse_text("f", text);
        let [ferry_model::Object::ConfigMap(c)] = p.objects.as_slice() else {
            panic!("{p:#?}")
        };
        assert_eq!(c.meta.labels["a"], "");
        assert_eq!(c.meta.labels["b"], "");
    }

    #[test]
    fn metallb_kinds_decode_with_field_paths() {
        let text = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p}\n\
                    spec:\n  addresses: [10.0.0.0/24]\n  serviceAllocation: {priority: high}\n";
        let p = parse_text("f", text);
        assert_eq!(p.errors.len(), 1, "{p:#?}");
        assert_eq!(p.errors[0].at.field, "spec.serviceAllocation.priority");
        assert_eq!(
            p.errors[0].message,
            "must be an integer, got string \"high\""
        );
    }
}
