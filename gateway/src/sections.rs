//! Cutting a YAML mapping document into its blocks, so that each block can be deserialized on
//! its own and a config with several mistakes reports all of them in one pass.
//!
//! A block keeps its lines where they were (every other line is blanked), so serde_yaml's
//! line and column in an error still point into the operator's file.

use std::ops::Range;

/// One key of a mapping and the lines of its value (0-based, the key's own line first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub key: String,
    pub lines: Range<usize>,
}

/// The top-level keys of `text` with their lines.
pub fn top_level(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    blocks(&lines, 0..lines.len(), 0)
}

/// The keys indented one level below the key of `parent` (whose first line is the key itself),
/// or none when its value is written on the key's line (flow style).
pub fn children(text: &str, parent: &Block) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let inner = parent.lines.start + 1..parent.lines.end;
    let indent = inner
        .clone()
        .filter_map(|i| content(lines[i]).map(|_| indentation(lines[i])))
        .min();
    match indent {
        Some(indent) if indent > 0 => blocks(&lines, inner, indent),
        _ => Vec::new(),
    }
}

/// `text` with only `keep` lines (and the parents' key lines, to keep the nesting) left.
pub fn masked(text: &str, keep: &[&Range<usize>]) -> String {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            if keep.iter().any(|r| r.contains(&i)) {
                line
            } else {
                ""
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines in `range` at exactly `indent` that start a key (not a list item, comment or blank).
fn blocks(lines: &[&str], range: Range<usize>, indent: usize) -> Vec<Block> {
    let mut found: Vec<Block> = Vec::new();
    for i in range.clone() {
        let line = lines[i];
        let Some(rest) = content(line) else { continue };
        if indentation(line) != indent || rest.starts_with('-') || rest.starts_with("---") {
            continue;
        }
        let key = rest
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_matches(['"', '\''])
            .to_owned();
        if let Some(last) = found.last_mut() {
            last.lines.end = i;
        }
        found.push(Block {
            key,
            lines: i..range.end,
        });
    }
    found
}

/// The line without its indentation, when it holds more than a comment.
fn content(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    (!rest.is_empty() && !rest.starts_with('#')).then_some(rest)
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# a comment
pack: {name: x, version: 1.0.0}
policy:
  pii-detector:
    action: redact

  dlp-filter:
    action: block
providers:
  targets:
  - id: a
";

    #[test]
    fn blocks_keep_their_lines() {
        let top = top_level(TEXT);
        let keys: Vec<&str> = top.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys, ["pack", "policy", "providers"]);
        assert_eq!(top[1].lines, 2..8);
        let kinds = children(TEXT, &top[1]);
        let keys: Vec<&str> = kinds.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys, ["pii-detector", "dlp-filter"]);
        assert!(
            children(TEXT, &top[0]).is_empty(),
            "flow style has no child lines"
        );
        let only = masked(TEXT, &[&(2..3), &kinds[1].lines]);
        assert_eq!(only.lines().nth(6), Some("  dlp-filter:"));
        assert_eq!(only.lines().nth(3), Some(""));
    }
}
