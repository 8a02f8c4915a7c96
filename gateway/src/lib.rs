//! kt-gateway: a governed LLM gateway and the reference implementation of the gateway
//! contract that kt-agent manages (health document, config file, reload, decision events).

pub mod config;
pub mod gateway;
pub mod http;
