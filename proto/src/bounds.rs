//! Bounds on everything an agent sends on its session.
//!
//! The coordinator [`check`]s every message and refuses one out of bounds with the field named
//! (a hostile or broken agent cannot grow an operator's listing or the event store); an honest
//! agent [`clamp`]s what it read from its gateway first, so it never sends anything the
//! coordinator would refuse.

use crate::v1::agent_message::Body;
use crate::v1::{ConfigRef, GatewayHealth, Hello, ProbeResult};

/// Labels per gateway.
pub const MAX_LABELS: usize = 32;
/// A label key or value, in bytes (Kubernetes' limit for a name).
pub const MAX_LABEL_LEN: usize = 63;
/// Identifiers, versions, hashes, provider and policy names.
pub const MAX_NAME_LEN: usize = 128;
/// Error texts and reasons.
pub const MAX_TEXT_LEN: usize = 4096;
/// Providers in one health report.
pub const MAX_PROVIDERS: usize = 64;
/// Capabilities in a hello; outcomes in a probe result.
pub const MAX_LIST: usize = 32;

/// A field out of bounds, named by its path in the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct OutOfBounds {
    pub field: String,
    pub problem: String,
}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> OutOfBounds {
    OutOfBounds {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Checks one label: key `[A-Za-z0-9][A-Za-z0-9._/-]*`, value `[A-Za-z0-9._-]*`, each at most
/// 63 bytes. The same rule applies where labels are written (the agent's config).
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = key.len() <= MAX_LABEL_LEN
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if !key_ok {
        return Err(format!(
            "label key {:?} must be 1-{MAX_LABEL_LEN} characters of A-Z a-z 0-9 . _ / -, starting with a letter or digit",
            shorten(key)
        ));
    }
    let value_ok = value.len() <= MAX_LABEL_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !value_ok {
        return Err(format!(
            "label {key}: value {:?} must be at most {MAX_LABEL_LEN} characters of A-Z a-z 0-9 . _ -",
            shorten(value)
        ));
    }
    Ok(())
}

/// Checks a set of labels: at most [`MAX_LABELS`], each by [`check_label`].
pub fn check_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels, at most {MAX_LABELS} are allowed",
            labels.len()
        ));
    }
    labels.into_iter().try_for_each(|(k, v)| check_label(k, v))
}

/// Checks a message from an agent.
pub fn check(body: &Body) -> Result<(), OutOfBounds> {
    match body {
        Body::Hello(hello) => check_hello(hello),
        Body::Heartbeat(_) => Ok(()),
        Body::Status(status) => status
            .health
            .as_ref()
            .map_or(Ok(()), |h| check_health("status.health", h)),
        Body::Goodbye(bye) => text("goodbye.reason", &bye.reason, MAX_TEXT_LEN),
        Body::ConfigStatus(status) => {
            text("config_status.offer_id", &status.offer_id, MAX_NAME_LEN)?;
            config_ref("config_status.config", status.config.as_ref())?;
            config_ref("config_status.running", status.running.as_ref())?;
            text("config_status.error", &status.error, MAX_TEXT_LEN)
        }
        Body::ProbeResult(result) => check_probe_result(result),
    }
}

pub fn check_hello(hello: &Hello) -> Result<(), OutOfBounds> {
    text("hello.gateway_id", &hello.gateway_id, MAX_NAME_LEN)?;
    text("hello.boot_id", &hello.boot_id, MAX_NAME_LEN)?;
    text("hello.agent_version", &hello.agent_version, MAX_NAME_LEN)?;
    check_labels(hello.labels.iter()).map_err(|problem| refuse("hello.labels", problem))?;
    count("hello.capabilities", hello.capabilities.len(), MAX_LIST)?;
    for (i, capability) in hello.capabilities.iter().enumerate() {
        text(format!("hello.capabilities[{i}]"), capability, MAX_NAME_LEN)?;
    }
    hello
        .health
        .as_ref()
        .map_or(Ok(()), |h| check_health("hello.health", h))
}

fn check_health(at: &str, health: &GatewayHealth) -> Result<(), OutOfBounds> {
    text(format!("{at}.error"), &health.error, MAX_TEXT_LEN)?;
    text(format!("{at}.version"), &health.version, MAX_NAME_LEN)?;
    if let Some(config) = &health.config {
        text(
            format!("{at}.config.version"),
            &config.version,
            MAX_NAME_LEN,
        )?;
        text(format!("{at}.config.hash"), &config.hash, MAX_NAME_LEN)?;
        text(
            format!("{at}.config.loaded_at"),
            &config.loaded_at,
            MAX_NAME_LEN,
        )?;
        text(
            format!("{at}.config.last_reload_error"),
            &config.last_reload_error,
            MAX_TEXT_LEN,
        )?;
    }
    count(
        format!("{at}.providers"),
        health.providers.len(),
        MAX_PROVIDERS,
    )?;
    for name in health.providers.keys() {
        text(format!("{at}.providers"), name, MAX_NAME_LEN)?;
    }
    Ok(())
}

fn check_probe_result(result: &ProbeResult) -> Result<(), OutOfBounds> {
    text("probe_result.probe_id", &result.probe_id, MAX_NAME_LEN)?;
    text("probe_result.error", &result.error, MAX_TEXT_LEN)?;
    count("probe_result.outcomes", result.outcomes.len(), MAX_LIST)?;
    for (i, o) in result.outcomes.iter().enumerate() {
        let at = format!("probe_result.outcomes[{i}]");
        text(format!("{at}.name"), &o.name, MAX_NAME_LEN)?;
        text(format!("{at}.verdict"), &o.verdict, MAX_NAME_LEN)?;
        text(format!("{at}.reason_code"), &o.reason_code, MAX_NAME_LEN)?;
        text(format!("{at}.error"), &o.error, MAX_TEXT_LEN)?;
    }
    Ok(())
}

fn config_ref(at: &str, config: Option<&ConfigRef>) -> Result<(), OutOfBounds> {
    let Some(config) = config else { return Ok(()) };
    text(format!("{at}.version"), &config.version, MAX_NAME_LEN)?;
    text(format!("{at}.hash"), &config.hash, MAX_NAME_LEN)
}

/// A text field: at most `max` bytes and no control characters but newlines and tabs.
fn text(field: impl Into<String>, value: &str, max: usize) -> Result<(), OutOfBounds> {
    if value.len() > max {
        return Err(refuse(
            field,
            format!("{} bytes, at most {max} are allowed", value.len()),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(refuse(field, "contains control characters"));
    }
    Ok(())
}

fn count(field: impl Into<String>, n: usize, max: usize) -> Result<(), OutOfBounds> {
    if n > max {
        return Err(refuse(
            field,
            format!("{n} entries, at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// Brings what an honest agent observed within bounds: long texts are cut (and say so),
/// control characters replaced, providers past [`MAX_PROVIDERS`] (in name order) or with
/// overlong names left out. Labels come from the agent's own config, checked at load.
pub fn clamp(body: &mut Body) {
    match body {
        Body::Hello(hello) => {
            if let Some(health) = &mut hello.health {
                clamp_health(health);
            }
        }
        Body::Status(status) => {
            if let Some(health) = &mut status.health {
                clamp_health(health);
            }
        }
        Body::ConfigStatus(status) => clamp_text(&mut status.error, MAX_TEXT_LEN),
        Body::ProbeResult(result) => {
            clamp_text(&mut result.error, MAX_TEXT_LEN);
            result.outcomes.truncate(MAX_LIST);
            for o in &mut result.outcomes {
                clamp_text(&mut o.error, MAX_TEXT_LEN);
                clamp_text(&mut o.reason_code, MAX_NAME_LEN);
            }
        }
        Body::Heartbeat(_) | Body::Goodbye(_) => {}
    }
}

fn clamp_health(health: &mut GatewayHealth) {
    clamp_text(&mut health.error, MAX_TEXT_LEN);
    clamp_text(&mut health.version, MAX_NAME_LEN);
    if let Some(config) = &mut health.config {
        clamp_text(&mut config.version, MAX_NAME_LEN);
        clamp_text(&mut config.hash, MAX_NAME_LEN);
        clamp_text(&mut config.loaded_at, MAX_NAME_LEN);
        clamp_text(&mut config.last_reload_error, MAX_TEXT_LEN);
    }
    health
        .providers
        .retain(|name, _| text("", name, MAX_NAME_LEN).is_ok());
    if health.providers.len() > MAX_PROVIDERS {
        let mut names: Vec<String> = health.providers.keys().cloned().collect();
        names.sort();
        for name in &names[MAX_PROVIDERS..] {
            health.providers.remove(name);
        }
    }
}

/// Cuts `value` to at most `max` bytes (on a character boundary, marked) and replaces control
/// characters other than newlines and tabs.
pub fn clamp_text(value: &mut String, max: usize) {
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        *value = value
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' && c != '\t' {
                    '?'
                } else {
                    c
                }
            })
            .collect();
    }
    if value.len() > max {
        const MARK: &str = "…[cut]";
        let mut end = max.saturating_sub(MARK.len());
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
        value.push_str(MARK);
    }
}

/// The start of a long value, for an error message.
fn shorten(value: &str) -> String {
    let mut value = value.to_owned();
    clamp_text(&mut value, 80);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ProviderHealth, StatusUpdate};

    fn hello_with_labels(labels: &[(&str, &str)]) -> Body {
        Body::Hello(Hello {
            gateway_id: "gw-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn labels_are_bounded_in_count_length_and_characters() {
        assert!(
            check(&hello_with_labels(&[
                ("region", "eu-west-1"),
                ("env", "prod")
            ]))
            .is_ok()
        );
        let long = "x".repeat(64);
        for (k, v) in [
            ("region", long.as_str()),
            (long.as_str(), "eu"),
            ("region", "eu west"),
            ("", "eu"),
            ("-x", "eu"),
            ("region", "eu\n"),
        ] {
            let refused = check(&hello_with_labels(&[(k, v)])).expect_err(k);
            assert_eq!(refused.field, "hello.labels");
        }
        let many: Vec<(String, String)> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert!(check(&hello_with_labels(&many)).is_err());
    }

    #[test]
    fn a_long_error_is_refused_by_field_and_clamped_by_an_agent() {
        let mut body = Body::Status(StatusUpdate {
            health: Some(GatewayHealth {
                error: "é".repeat(MAX_TEXT_LEN),
                ..Default::default()
            }),
        });
        let refused = check(&body).expect_err("too long");
        assert_eq!(refused.field, "status.health.error");
        clamp(&mut body);
        check(&body).expect("clamped");
        let Body::Status(StatusUpdate { health: Some(h) }) = &body else {
            unreachable!()
        };
        assert!(h.error.ends_with("…[cut]") && h.error.len() <= MAX_TEXT_LEN);
    }

    #[test]
    fn providers_are_bounded_and_clamping_keeps_the_first_by_name() {
        let providers = (0..MAX_PROVIDERS + 10)
            .map(|i| (format!("p{i:03}"), ProviderHealth::default()))
            .chain([("x".repeat(MAX_NAME_LEN + 1), ProviderHealth::default())])
            .collect();
        let mut body = Body::Hello(Hello {
            health: Some(GatewayHealth {
                providers,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            check(&body).expect_err("too many").field,
            "hello.health.providers"
        );
        clamp(&mut body);
        check(&body).expect("clamped");
        let Body::Hello(Hello {
            health: Some(h), ..
        }) = &body
        else {
            unreachable!()
        };
        assert_eq!(h.providers.len(), MAX_PROVIDERS);
        assert!(h.providers.contains_key("p000"));
    }
}
