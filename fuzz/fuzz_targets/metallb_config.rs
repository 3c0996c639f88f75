//! MetalLB's legacy ConfigMap: any text as `data.config` of `metallb-system/config`, into
//! `pools::load`.
//!
//! Properties: no panic; every problem names the ConfigMap and a field under `data`; the pools
//! kept have unique names, non-empty sorted ranges, share no address, print as entries that
//! parse back to the same range, and hand out only assignable addresses of their own; every
//! layer-2 announcement names kept pools.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

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
});
