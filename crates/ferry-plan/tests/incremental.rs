//! The incremental planner gives exactly what a fresh plan gives, whatever came before.

mod common;

use common::*;
use ferry_plan::plan::{plan, Planner};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn incremental_plans_equal_fresh_plans(
        a in service_specs(12),
        b in service_specs(12),
        changes in proptest::collection::vec(change(), 0..14),
        changes2 in proptest::collection::vec(change(), 0..14),
    ) {
        let cfg = with_lb_pools(config());
        let sa = services_from_specs(&a);
        let sb = evolve(&a, &b, &changes);
        let sc = evolve(&b, &a, &changes2);
        let mut p = Planner::default();
        for snapshot in [&sa, &sb, &sc, &sa] {
            let inc = p.plan(&cfg, snapshot);
            let fresh = plan(&cfg, snapshot);
            prop_assert_eq!(&inc, &fresh);
            // Shared chains keep the fingerprint a fresh computation gives.
            for (name, c) in &inc.chains {
                prop_assert_eq!(c.fingerprint(), fresh.chains[name].fingerprint());
            }
        }
        // A different configuration is planned from scratch.
        let mut cfg2 = cfg.clone();
        cfg2.node_name = OTHER_NODE.into();
        prop_assert_eq!(p.plan(&cfg2, &sb), plan(&cfg2, &sb));
    }
}
