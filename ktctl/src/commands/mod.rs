//! One module per noun, one file per verb.

pub mod agent;
pub mod cluster;
pub mod completion;
pub mod config;
pub mod demo;
pub mod dev;
pub mod doctor;
pub mod events;
pub mod fleet;
pub mod gateway;
pub mod groups;
pub mod pki;
pub mod rollout;
pub mod shadow;
pub mod token;

use std::collections::HashMap;

/// Parses `key=value[,key=value...]`, the label selector of `--selector`.
pub fn parse_selector(text: &str) -> Result<HashMap<String, String>, String> {
    text.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}
