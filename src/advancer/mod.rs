//! The checkpoint advancer: the deterministic core, its configuration, and the daemon that
//! drives it with threads at the edges.

pub mod config;
pub mod core;
pub mod metrics;
pub mod status;
#[cfg(test)]
mod tests;

pub use config::{Config, Settings, SETTINGS};
pub use core::{latest_believable, Action, Advancer, PollPlan, TaskStatus, FUTURE_TOLERANCE};
