//! Reading a shadow run's flip matrix: how many requests went from one verdict to another, and
//! their share of those compared.

use crate::v1::{FlipCell, FlipReport};

/// Requests whose verdict went from `active` to `shadow` (0 when no cell holds them).
pub fn count(cells: &[FlipCell], active: &str, shadow: &str) -> u64 {
    cells
        .iter()
        .find(|c| c.active == active && c.shadow == shadow)
        .map_or(0, |c| c.count)
}

/// Their share of `compared` requests (0 when none was compared).
pub fn share(cells: &[FlipCell], compared: u64, active: &str, shadow: &str) -> f64 {
    if compared == 0 {
        0.0
    } else {
        count(cells, active, shadow) as f64 / compared as f64
    }
}

impl FlipReport {
    /// The share of this report's compared requests that went from `active` to `shadow`.
    pub fn share(&self, active: &str, shadow: &str) -> f64 {
        share(&self.cells, self.compared, active, shadow)
    }
}
