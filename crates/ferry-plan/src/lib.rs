//! Rule planning for ferry's nftables dataplane, all pure:
//! - [`ir`]: a typed model of ferry's table and its rendering to `nft` syntax;
//! - [`plan`]: resolved services -> that table;
//! - [`diff`]: what the kernel has vs what is planned -> one minimal atomic script;
//! - [`trace`]: walks a packet through a planned table (which chain, which endpoint, how likely).

pub mod diff;
pub mod ir;
pub mod plan;
pub mod trace;

pub use diff::{diff, Changes, LiveState};
pub use ir::Ruleset;
pub use plan::{plan, PlanConfig};
