//! Integration tests: real HTTP servers on 127.0.0.1, real clients, and the real proxy
//! started through its library entry point (the CLI tests run the binary). One binary, so
//! it builds once.

mod cli;
mod control;
mod drain;
mod errors;
mod headers;
mod health;
mod layout;
mod metrics;
mod mirror;
mod rollout;
mod routing;
mod shutdown;
mod streaming;
mod support;
