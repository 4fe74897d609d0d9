//! The checkpoint advancer's deterministic core and its configuration; `daemon` drives it.
//! The configuration is re-exported at the crate root ([`crate::Config`]).

pub(crate) mod config;
pub(crate) mod core;
#[cfg(test)]
mod tests;

// Crate-internal paths; the public one is the crate root.
pub(crate) use config::Config;
pub use core::{latest_believable, Action, Advancer, PollPlan, TaskStatus, FUTURE_TOLERANCE};
