//! The checkpoint advancer's deterministic core and its configuration; `daemon` drives it.

pub mod config;
pub mod core;
#[cfg(test)]
mod tests;

pub use config::{Config, Settings, SETTINGS};
pub use core::{latest_believable, Action, Advancer, PollPlan, TaskStatus, FUTURE_TOLERANCE};
