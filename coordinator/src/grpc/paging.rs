//! Listings in parts bounded by rows and bytes, so that no fleet (however large, however long
//! its records) produces a message a client cannot decode. Gateways are in id order.

use kt_proto::v1::GatewayState;
use prost::Message;

/// Rows per page when the caller names no page size, and the most it may ask for.
const DEFAULT_PAGE_ROWS: usize = 1000;
const MAX_PAGE_ROWS: usize = 5000;
/// A page stops growing once its rows reach this size (a single row always fits: every field
/// an agent sends is bounded, see `kt_proto::bounds`).
const MAX_PAGE_BYTES: usize = 1 << 20;

/// The page after `token` (the last gateway id of the previous page) and the next token, empty
/// when this is the last page.
pub fn page(
    mut gateways: Vec<GatewayState>,
    token: &str,
    page_size: u32,
) -> (Vec<GatewayState>, String) {
    let rows = match page_size as usize {
        0 => DEFAULT_PAGE_ROWS,
        n => n.min(MAX_PAGE_ROWS),
    };
    let start = if token.is_empty() {
        0
    } else {
        gateways.partition_point(|g| g.gateway_id.as_str() <= token)
    };
    gateways.drain(..start);
    let n = fitting(&gateways, rows);
    let next = if n < gateways.len() {
        gateways[n - 1].gateway_id.clone()
    } else {
        String::new()
    };
    gateways.truncate(n);
    (gateways, next)
}

/// A snapshot cut into parts, each flagged with whether more follow; an empty fleet is one
/// empty part.
pub fn parts(mut gateways: Vec<GatewayState>) -> Vec<(Vec<GatewayState>, bool)> {
    let mut parts = Vec::new();
    loop {
        let n = fitting(&gateways, MAX_PAGE_ROWS);
        let rest = gateways.split_off(n);
        let more = !rest.is_empty();
        parts.push((gateways, more));
        if !more {
            return parts;
        }
        gateways = rest;
    }
}

/// How many of the first rows fit in a page: at most `rows`, at least one when there is one.
fn fitting(gateways: &[GatewayState], rows: usize) -> usize {
    let mut bytes = 0;
    for (n, g) in gateways.iter().take(rows).enumerate() {
        bytes += g.encoded_len() + 8;
        if bytes > MAX_PAGE_BYTES && n > 0 {
            return n;
        }
    }
    gateways.len().min(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(n: usize, padding: usize) -> GatewayState {
        GatewayState {
            gateway_id: format!("gw-{n:05}"),
            agent_version: "x".repeat(padding),
            ..Default::default()
        }
    }

    #[test]
    fn pages_walk_every_gateway_once_within_the_byte_bound() {
        let fleet: Vec<GatewayState> = (0..3000).map(|n| gateway(n, 2000)).collect();
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (page, next) = page(fleet.clone(), &token, 0);
            let bytes: usize = page.iter().map(Message::encoded_len).sum();
            assert!(bytes <= MAX_PAGE_BYTES, "a page of {bytes} bytes");
            seen.extend(page.into_iter().map(|g| g.gateway_id));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let all: Vec<String> = fleet.into_iter().map(|g| g.gateway_id).collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn a_snapshot_is_cut_into_flagged_parts() {
        let fleet: Vec<GatewayState> = (0..2000).map(|n| gateway(n, 2000)).collect();
        let parts = parts(fleet);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|(_, more)| *more));
        assert!(!parts[parts.len() - 1].1);
        assert_eq!(parts.iter().map(|(p, _)| p.len()).sum::<usize>(), 2000);
        assert_eq!(super::parts(Vec::new()), vec![(Vec::new(), false)]);
    }
}
