//! Planning what changed only ([`Planner::update_changed`], [`ShardedPlanner::update_changed`])
//! gives exactly the table a fresh plan of the resulting services gives, whatever mix of full
//! updates and changes came before; and what it says it touched is all a differ needs.

mod common;

use common::*;
use ferry_model::view::ResolvedService;
use ferry_model::ObjectRef;
use ferry_plan::diff::{diff_touched, LiveState};
use ferry_plan::plan::{plan_sharded, NeedsFullUpdate, Planner, ShardedPlanner, Touched};
use ferry_plan::{plan, PlanConfig, Ruleset};
use proptest::prelude::*;

/// Versions of services: list A's, then list B's. Service i of both lists has the same name and
/// cluster IP: of the same namespace they are two versions of one service, of two namespaces
/// two services asking for the same elements (the smaller namespace/name must win).
fn candidates(a: &[ServiceSpec], b: &[ServiceSpec]) -> Vec<ResolvedService> {
    let mut out = services_from_specs(a);
    out.extend(services_from_specs(b));
    out
}

/// One step: a full update or a change, to the services `mask` picks (in `candidates` order
/// rotated by `rotate`, the first of a name counting); `noise` adds what a caller may
/// harmlessly pass too: unchanged services, a service twice, names of services that are not
/// there, a stale version of a removed service.
#[derive(Debug, Clone)]
struct Step {
    full: bool,
    mask: Vec<bool>,
    rotate: usize,
    noise: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::bool::weighted(0.25),
        proptest::collection::vec(proptest::bool::weighted(0.7), 24),
        0usize..24,
        any::<bool>(),
    )
        .prop_map(|(full, mask, rotate, noise)| Step {
            full,
            mask,
            rotate,
            noise,
        })
}

fn pick(cands: &[ResolvedService], s: &Step) -> Vec<ResolvedService> {
    let mut out: Vec<ResolvedService> = Vec::new();
    let n = cands.len();
    for k in 0..n {
        let i = (k + s.rotate) % n;
        if s.mask.get(i).copied().unwrap_or(true) && !out.iter().any(|o| o.id == cands[i].id) {
            out.push(cands[i].clone());
        }
    }
    out
}

/// What changed from `prev` to `next`: (changed, removed).
fn delta(
    prev: &[ResolvedService],
    next: &[ResolvedService],
    noise: bool,
) -> (Vec<ResolvedService>, Vec<ObjectRef>) {
    let mut changed: Vec<ResolvedService> = next
        .iter()
        .filter(|s| noise || !prev.contains(s))
        .cloned()
        .collect();
    let mut removed: Vec<ObjectRef> = prev
        .iter()
        .filter(|p| !next.iter().any(|s| s.id == p.id))
        .map(|p| p.id.clone())
        .collect();
    if noise {
        if let Some(first) = changed.first().cloned() {
            changed.push(first);
        }
        // Removed wins over changed.
        for p in prev.iter().filter(|p| removed.contains(&p.id)) {
            changed.push(p.clone());
        }
        removed.push(ObjectRef::new("nobody", "ghost"));
    }
    (changed, removed)
}

/// The kernel's view kept up to date from what was touched equals the table.
fn follow(live: &mut LiveState, rs: &Ruleset, t: &Touched) -> Result<(), TestCaseError> {
    match diff_touched(live, rs, t) {
        Some(_) => live.update_touched(rs, t),
        None => *live = LiveState::of(rs),
    }
    prop_assert_eq!(&*live, &LiveState::of(rs));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn changes_plan_what_a_fresh_plan_gives(
        a in service_specs(12),
        b in service_specs(12),
        steps in proptest::collection::vec(step(), 1..8),
    ) {
        let cfg = with_lb_pools(dual_stack_config());
        let cands = candidates(&a, &b);
        let mut p = Planner::default();
        let mut live = LiveState::default();
        let mut prev: Vec<ResolvedService> = Vec::new();
        for s in &steps {
            let next = pick(&cands, s);
            let t = if s.full {
                p.update(&cfg, &next).1
            } else {
                let (changed, removed) = delta(&prev, &next, s.noise);
                p.update_changed(&cfg, &changed, &removed).expect("the same configuration")
            };
            let fresh = plan(&cfg, &next);
            prop_assert_eq!(p.ruleset(), &fresh);
            for (name, c) in &p.ruleset().chains {
                prop_assert_eq!(c.fingerprint(), fresh.chains[name].fingerprint());
            }
            follow(&mut live, p.ruleset(), &t)?;
            prev = next;
        }
    }

    #[test]
    fn sharded_changes_plan_what_a_fresh_sharded_plan_gives(
        a in service_specs(12),
        b in service_specs(12),
        steps in proptest::collection::vec(step(), 1..8),
        n in prop_oneof![Just(2u16), Just(3), Just(8)],
    ) {
        let cfg = PlanConfig { shards: n, ..with_lb_pools(dual_stack_config()) };
        let cands = candidates(&a, &b);
        let mut p = ShardedPlanner::default();
        let mut live: Vec<LiveState> = vec![LiveState::default(); usize::from(n) + 1];
        let mut prev: Vec<ResolvedService> = Vec::new();
        for s in &steps {
            let next = pick(&cands, s);
            let touched = if s.full {
                p.update(&cfg, &next)
            } else {
                let (changed, removed) = delta(&prev, &next, s.noise);
                p.update_changed(&cfg, &changed, &removed).expect("the same configuration")
            };
            let fresh = plan_sharded(&cfg, &next);
            let tables = p.tables();
            prop_assert_eq!(tables.len(), fresh.len());
            prop_assert_eq!(touched.len(), fresh.len());
            for (k, ((rs, want), t)) in tables.iter().zip(&fresh).zip(&touched).enumerate() {
                prop_assert_eq!(*rs, want, "table {}", k);
                follow(&mut live[k], rs, t)?;
            }
            prev = next;
        }
    }
}

/// A change touches only the changed service's chains and elements, and only its shard.
#[test]
fn a_change_touches_only_what_changed() {
    let cfg = with_lb_pools(dual_stack_config());
    let mut services = seed_services();
    let mut p = Planner::default();
    p.update(&cfg, &services);
    let victim = services
        .iter()
        .position(|s| s.ports.iter().any(|p| !p.endpoints.is_empty()))
        .expect("a seed service with endpoints");
    let port = services[victim]
        .ports
        .iter_mut()
        .find(|p| !p.endpoints.is_empty())
        .expect("a port with endpoints");
    port.endpoints.truncate(1);
    port.endpoints[0].port = port.endpoints[0].port.wrapping_add(1);
    let t = p
        .update_changed(&cfg, [&services[victim]], [])
        .expect("the same configuration");
    assert!(!t.full);
    assert!(!t.chains.is_empty());
    let id = services[victim].id.clone();
    let mine = format!("{}/{}", id.namespace, id.name);
    assert!(t.chains.iter().all(|c| c.contains(&mine)), "{t:?}");
    assert_eq!(p.ruleset(), &plan(&cfg, &services));
    // Nothing changed: nothing touched.
    let t = p
        .update_changed(&cfg, &services, [])
        .expect("the same configuration");
    assert_eq!(t, Touched::default());

    let scfg = PlanConfig { shards: 8, ..cfg };
    let mut sp = ShardedPlanner::default();
    sp.update(&scfg, &services);
    for port in &mut services[victim].ports {
        port.endpoints.clear();
    }
    let t = sp
        .update_changed(&scfg, [&services[victim]], [])
        .expect("the same configuration");
    let shard = usize::from(ferry_plan::plan::shard_of(&id, 8));
    for (k, t) in t.iter().enumerate().skip(1) {
        assert_eq!(
            *t == Touched::default(),
            k != shard + 1,
            "table {k}, shard {shard}: {t:?}"
        );
    }
    let tables: Vec<Ruleset> = sp.tables().into_iter().cloned().collect();
    assert_eq!(tables, plan_sharded(&scfg, &services));
}

/// Another configuration needs every service: a change is refused and nothing moves.
#[test]
fn another_configuration_needs_a_full_update() {
    let cfg = with_lb_pools(dual_stack_config());
    let services = seed_services();
    let mut other = cfg.clone();
    other.node_name = OTHER_NODE.into();

    let mut p = Planner::default();
    p.update(&cfg, &services);
    assert_eq!(
        p.update_changed(&other, &services[..1], []),
        Err(NeedsFullUpdate)
    );
    assert_eq!(p.ruleset(), &plan(&cfg, &services));
    // From nothing, a change is a plan of the changed services.
    let mut q = Planner::default();
    let t = q
        .update_changed(&other, &services, [])
        .expect("a first update");
    assert!(t.full);
    assert_eq!(q.ruleset(), &plan(&other, &services));

    let (scfg, sother) = (
        PlanConfig {
            shards: 4,
            ..cfg.clone()
        },
        PlanConfig { shards: 4, ..other },
    );
    let mut sp = ShardedPlanner::default();
    sp.update(&scfg, &services);
    assert_eq!(
        sp.update_changed(&sother, &services[..1], []),
        Err(NeedsFullUpdate)
    );
    let mut sq = ShardedPlanner::default();
    let t = sq
        .update_changed(&sother, &services, [])
        .expect("a first update");
    assert!(t.iter().all(|t| t.full));
    let tables: Vec<Ruleset> = sq.tables().into_iter().cloned().collect();
    assert_eq!(tables, plan_sharded(&sother, &services));
}
