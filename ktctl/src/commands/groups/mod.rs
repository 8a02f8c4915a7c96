//! `ktctl groups`: the named sets of gateways rollouts target.

pub mod apply;
pub mod list;

use kt_proto::v1::GroupInfo;

use crate::view::{Output, print_structured, table};

/// Prints groups as a table or as structured output.
pub fn print(groups: &[GroupInfo], output: Output) -> anyhow::Result<()> {
    if output != Output::Table {
        let rows: Vec<_> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "name": g.name, "gateways": g.gateways, "selector": g.selector,
                    "config_source": g.config_source, "members": g.members,
                })
            })
            .collect();
        return print_structured(&rows, output);
    }
    let mut t = table(&["GROUP", "LISTED", "SELECTOR", "MEMBERS"]);
    for g in groups {
        let mut selector: Vec<String> =
            g.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        selector.sort();
        t.add_row(vec![
            g.name.clone(),
            if g.gateways.is_empty() {
                "-".into()
            } else {
                g.gateways.join(",")
            },
            if selector.is_empty() {
                "-".into()
            } else {
                selector.join(",")
            },
            if g.members.is_empty() {
                "-".into()
            } else {
                g.members.join(",")
            },
        ]);
    }
    println!("{t}");
    Ok(())
}
