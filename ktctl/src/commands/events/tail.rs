//! `ktctl events tail (--all-gateways | --group G | --gateway ID | --selector k=v) [filters]`

use std::io::Write;
use std::time::Duration;

use kt_proto::v1::{TailEventsRequest, tail_events_response::Item};
use serde_json::Value;

use super::{Target, since_ms};
use crate::Session;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per event: time, verdict, gateway, region, provider/model, reason, latency.
    Line,
    /// The line, then each policy's result and latency.
    Detailed,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, value_parser = ["allow", "block", "redact", "escalate"])]
    pub verdict: Option<String>,
    /// Events in which this policy decided something other than allow.
    #[arg(long)]
    pub policy: Option<String>,
    /// A reason code, e.g. `prompt_injection.phrase`.
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long)]
    pub config_version: Option<String>,
    /// Stored events from this far back (`10m`) or this time (RFC 3339) first.
    #[arg(long)]
    pub since: Option<String>,
    /// Print this many events, then stop.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print the stored events (from --since, else all kept) and stop, without following.
    #[arg(long)]
    pub no_follow: bool,
    /// One JSON object per line (the event as the gateway wrote it, plus its gateway and region).
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = Format::Line)]
    pub format: Format,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut filter = args.target.filter();
    filter.verdict = args.verdict.clone().unwrap_or_default();
    filter.policy = args.policy.clone().unwrap_or_default();
    filter.reason = args.reason.clone().unwrap_or_default();
    filter.config_version = args.config_version.clone().unwrap_or_default();
    let since_unix_ms = args
        .since
        .as_deref()
        .map(since_ms)
        .transpose()?
        .unwrap_or(0);
    let mut client = session.client().await?;
    let mut stream = client
        .tail_events(TailEventsRequest {
            filter: Some(filter),
            since_unix_ms,
            limit: args.limit.unwrap_or(0),
            no_follow: args.no_follow,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            next = stream.message() => next.map_err(crate::status_error)?,
        };
        let Some(first) = next else { return Ok(()) };
        // What arrived together (a stored batch, a replay) is shown in the gateways' time order.
        let mut ready = vec![first];
        let mut ended = false;
        while ready.len() < MAX_SORTED {
            let Ok(more) = tokio::time::timeout(Duration::ZERO, stream.message()).await else {
                break;
            };
            match more.map_err(crate::status_error)? {
                Some(response) => ready.push(response),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        let mut items: Vec<(String, Option<Value>, Item)> = ready
            .into_iter()
            .filter_map(|r| r.item)
            .map(|item| match &item {
                Item::Event(e) => {
                    let event: Value = serde_json::from_slice(&e.event).unwrap_or(Value::Null);
                    let at = event["timestamp"].as_str().unwrap_or_default().to_owned();
                    (at, Some(event), item)
                }
                _ => (String::new(), None, item),
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, event, item) in items {
            print_item(&mut out, &args, event, item)?;
        }
        out.flush()?;
        if ended {
            return Ok(());
        }
    }
}

/// The most items sorted together: a tail that is always behind still prints as it goes.
const MAX_SORTED: usize = 1000;

/// Prints one event, gap or missed-events notice.
fn print_item(
    out: &mut impl Write,
    args: &Args,
    event: Option<Value>,
    item: Item,
) -> anyhow::Result<()> {
    match item {
        Item::Event(e) => {
            let mut event = event.unwrap_or(Value::Null);
            if args.json {
                authenticated_identity(&mut event, &e.gateway_id, &e.region);
                writeln!(out, "{event}")?;
            } else {
                writeln!(out, "{}", line(&event, &e.gateway_id, &e.region))?;
                if args.format == Format::Detailed {
                    for p in event["policies_evaluated"].as_array().into_iter().flatten() {
                        writeln!(
                            out,
                            "    {:<18} {:<9} {}us",
                            p["name"].as_str().unwrap_or(""),
                            p["result"].as_str().unwrap_or(""),
                            p["latency_us"]
                        )?;
                    }
                }
            }
        }
        Item::Gap(g) => {
            let gap = g.gap.unwrap_or_default();
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "gap": { "gateway_id": g.gateway_id, "count": gap.count, "first_seq": gap.first_seq, "last_seq": gap.last_seq, "reason": gap.reason } })
                )?;
            } else {
                writeln!(
                    out,
                    "{}: GAP {} events lost (seq {}..{}): {}",
                    g.gateway_id, gap.count, gap.first_seq, gap.last_seq, gap.reason
                )?;
            }
        }
        Item::Scope(scope) => {
            // On stderr, so that piped events stay events.
            eprintln!("note: {scope}");
        }
        Item::Missed(n) => {
            if args.json {
                writeln!(out, "{}", serde_json::json!({ "missed": n }))?;
            } else {
                writeln!(out, "!! {n} events missed: this tail read too slowly")?;
            }
        }
    }
    Ok(())
}

/// Shows the gateway id and region the coordinator stored for the event (from the agent's
/// certificate and hello), whatever the event line says; a differing claim is kept beside them
/// as `reported_gateway_id` / `reported_region`.
fn authenticated_identity(event: &mut Value, gateway: &str, region: &str) {
    let Some(object) = event.as_object_mut() else {
        return;
    };
    for (key, value) in [("gateway_id", gateway), ("region", region)] {
        let authentic = Value::String(value.to_owned());
        match object.insert(key.to_owned(), authentic.clone()) {
            Some(claimed) if claimed != authentic => {
                object.insert(format!("reported_{key}"), claimed);
            }
            _ => {}
        }
    }
}

/// The default line of one event.
fn line(event: &Value, gateway: &str, region: &str) -> String {
    let s = |key: &str| event[key].as_str().unwrap_or("-").to_owned();
    let time = event["timestamp"]
        .as_str()
        .map(|t| t.chars().take(23).collect::<String>())
        .unwrap_or_default();
    let model = format!(
        "{}/{}",
        event["provider"].as_str().unwrap_or("-"),
        s("model")
    );
    let reason = event["reason_code"]
        .as_str()
        .filter(|r| !r.is_empty())
        .unwrap_or("-");
    let latency = event["latency_ms"]
        .as_f64()
        .map(|l| format!("{l:.1}ms"))
        .unwrap_or_default();
    format!(
        "{time:<23} {:<8} {gateway:<14} {:<6} {model:<28} {reason:<26} {latency}",
        s("verdict"),
        if region.is_empty() { "-" } else { region }
    )
}
