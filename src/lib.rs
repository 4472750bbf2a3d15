//! switchyard: a reverse proxy and traffic-shifting sidecar for long-lived agent traffic.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! config (pure) ─► routes (immutable Table, built on the control path)
//!                    ▲ reads            ▲ owns pools of
//! proxy (hot path) ──┘   upstream ◄─────┘ (connections to servers)
//! control (single writer: commands, state, events) ─► routes::TableWriter, health probes
//! admin (socket, ctl) ─► control::Handle        health ─► per-server atomics (no swap)
//! app: the composition root that builds and starts every part, and nothing imports it.
//! ```
//!
//! The hot path holds a [`routes::TableReader`], which cannot store; only the control path
//! holds the [`routes::TableWriter`].

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod demo;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod rollout;
pub mod routes;
pub mod stats;
#[cfg(test)]
mod test_support;
pub mod upstream;
