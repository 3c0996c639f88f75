//! MetalLB's legacy ConfigMap: any text as `data.config` of `metallb-system/config`, into
//! `pools::load`, then `bgp::load` and the routes a node would announce.
//!
//! Properties: no panic; every problem names the ConfigMap and a field under `data`; the pools
//! kept have unique names, non-empty sorted ranges, share no address, print as entries that
//! parse back to the same range, and hand out only assignable addresses of their own; every
//! layer-2 announcement names kept pools. BGP: peers have unique names, ASNs >= 1 and a
//! keepalive no longer than the hold time; advertisements name kept bgp pools with
//! aggregation lengths of their family; routes go only to peers selecting the node, one per
//! prefix, each covering an address of the pools.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use ferry_model::bgp::{self, BgpInputs, LbAddress};
use ferry_model::pools::{self, parse_address_entry};
use ferry_model::{ConfigMap, Meta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let cm = ConfigMap {
        meta: Meta {
            name: pools::LEGACY_NAME.into(),
            namespace: pools::LEGACY_NAMESPACE.into(),
            ..Meta::default()
        },
        data: BTreeMap::from([(pools::LEGACY_KEY.to_string(), text)]),
    };
    let (config, errors) = pools::load(std::slice::from_ref(&cm), &[], &[]);

    for e in &errors {
        assert_eq!(e.object, "ConfigMap metallb-system/config", "{e}");
        assert!(e.field.starts_with("data"), "{e}: field {:?}", e.field);
        assert!(!e.message.trim().is_empty(), "{e:?}");
    }

    let mut names = BTreeSet::new();
    for (i, p) in config.pools.iter().enumerate() {
        assert!(!p.name.is_empty());
        assert!(names.insert(&p.name), "pool name {:?} twice", p.name);
        assert!(!p.ranges.is_empty(), "{p:?}");
        for (j, r) in p.ranges.iter().enumerate() {
            assert!(r.size() >= 1);
            assert_eq!(parse_address_entry(&r.to_string()), Ok(*r), "{r}");
            for other in p.ranges.iter().skip(j + 1) {
                assert!(!r.overlaps(other), "{p:?}: {r} and {other}");
                assert!((!r.is_ipv4(), r.first()) < (!other.is_ipv4(), other.first()));
            }
            for q in config.pools.iter().skip(i + 1) {
                assert!(
                    !q.ranges.iter().any(|s| s.overlaps(r)),
                    "{r} in {p:?} and {q:?}"
                );
            }
            assert_eq!(config.pool_of(r.first()).map(|x| &x.name), Some(&p.name));
            assert_eq!(config.pool_of(r.last()).map(|x| &x.name), Some(&p.name));
        }
        for ip in p.addresses().take(4) {
            assert!(p.is_assignable(ip), "{ip} handed out by {p:?}");
        }
        for v6 in [false, true] {
            if let Some(ip) = p.addresses_of(v6).next() {
                assert_eq!(ip.is_ipv6(), v6);
                assert!(p.has_family(v6));
            }
        }
    }
    for a in &config.l2 {
        for name in &a.pools {
            assert!(
                config.pool(name).is_some(),
                "{a:?} names no kept pool {name:?}"
            );
        }
    }

    let (bgp, errors) = bgp::load(
        &config,
        &BgpInputs {
            config_maps: std::slice::from_ref(&cm),
            ..BgpInputs::default()
        },
    );
    for e in &errors {
        assert_eq!(e.object, "ConfigMap metallb-system/config", "{e}");
        assert!(e.field.starts_with("data"), "{e}: field {:?}", e.field);
        assert!(!e.message.trim().is_empty(), "{e:?}");
    }
    let mut peer_names = BTreeSet::new();
    for p in &bgp.peers {
        assert!(peer_names.insert(&p.name), "peer {:?} twice", p.name);
        assert!(p.my_asn >= 1 && p.peer_asn >= 1, "{p:?}");
        assert!(p.keepalive_time <= p.hold_time, "{p:?}");
        if let Some(b) = &p.bfd_profile {
            assert!(bgp.bfd_profile(b).is_some(), "{p:?}");
        }
    }
    for a in &bgp.advertisements {
        assert!(a.aggregation_length <= 32 && a.aggregation_length_v6 <= 128, "{a:?}");
        for name in &a.pools {
            assert!(config.pool(name).is_some(), "{a:?} names no kept pool {name:?}");
        }
    }
    // Every pool's first addresses, eligible, on a node labelled by the first peer's selector.
    let addresses: Vec<LbAddress> = config
        .pools
        .iter()
        .flat_map(|p| {
            p.addresses().take(3).map(|ip| LbAddress {
                ip,
                pool: p.name.clone(),
                eligible: true,
            })
        })
        .collect();
    let node = bgp
        .peers
        .iter()
        .flat_map(|p| p.node_selectors.first())
        .map(|s| s.match_labels.clone())
        .next()
        .unwrap_or_default();
    for pr in bgp.announcements(&node, &addresses) {
        let peer = bgp.peer(&pr.peer).expect("a known peer");
        assert!(peer.selects_node(&node), "{pr:?}");
        let mut prefixes = BTreeSet::new();
        for r in &pr.routes {
            assert!(prefixes.insert(r.prefix), "{r:?} twice");
            assert!(addresses.iter().any(|a| r.prefix.contains(&a.ip)), "{r:?}");
        }
    }
});
