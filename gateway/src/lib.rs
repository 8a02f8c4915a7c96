//! kt-gateway: a governed LLM gateway and the reference implementation of the gateway
//! contract that kt-agent manages (health document, config file, reload, decision events).
//!
//! A request goes `http` → `proxy` (parse, `policy` chain, route to a provider target,
//! forward) → `events` (one decision event). `gateway` holds the running config and counters;
//! `providers` probes the targets; `mock` is the stand-in provider for tests and demos.

pub mod cache;
pub mod config;
pub mod events;
pub mod gateway;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod mock;
pub mod policy;
pub mod probe_token;
pub mod providers;
pub mod proxy;
pub mod sections;
pub mod shadow;
