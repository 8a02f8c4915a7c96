//! Case-insensitive phrase and regex matching, shared by prompt-injection and dlp-filter.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::Regex;

use super::CompileError;

/// What matched, for the reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    Phrase,
    Pattern,
}

/// Phrases (ASCII case-insensitive substrings) and regexes (case-insensitive).
#[derive(Debug)]
pub struct Matcher {
    phrases: Option<AhoCorasick>,
    patterns: Vec<Regex>,
}

impl Matcher {
    pub fn compile(
        kind: &str,
        phrases: &[String],
        patterns: &[String],
    ) -> Result<Self, Vec<CompileError>> {
        let mut errors = Vec::new();
        let phrases: Vec<&String> = phrases.iter().filter(|p| !p.trim().is_empty()).collect();
        let automaton = if phrases.is_empty() {
            None
        } else {
            match AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostFirst)
                .build(&phrases)
            {
                Ok(ac) => Some(ac),
                Err(e) => {
                    errors.push(CompileError {
                        needle: kind.to_owned(),
                        message: format!("policy.{kind}: phrases: {e}"),
                    });
                    None
                }
            }
        };
        let mut compiled = Vec::new();
        for pattern in patterns {
            match regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => compiled.push(re),
                Err(e) => errors.push(CompileError {
                    needle: pattern.clone(),
                    message: format!(
                        "policy.{kind}.patterns: {pattern:?} is not a valid regex: {}",
                        first_line(&e.to_string())
                    ),
                }),
            }
        }
        if errors.is_empty() {
            Ok(Matcher {
                phrases: automaton,
                patterns: compiled,
            })
        } else {
            Err(errors)
        }
    }

    pub fn find(&self, text: &str) -> Option<Hit> {
        if self.phrases.as_ref().is_some_and(|ac| ac.is_match(text)) {
            return Some(Hit::Phrase);
        }
        self.patterns
            .iter()
            .any(|re| re.is_match(text))
            .then_some(Hit::Pattern)
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(phrases: &[&str], patterns: &[&str]) -> Matcher {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        Matcher::compile("t", &owned(phrases), &owned(patterns)).expect("compiles")
    }

    #[test]
    fn phrases_are_case_insensitive_and_patterns_are_regexes() {
        let m = matcher(
            &["ignore all previous instructions"],
            &[r"AKIA[0-9A-Z]{16}"],
        );
        assert_eq!(
            m.find("Please IGNORE ALL previous Instructions now"),
            Some(Hit::Phrase)
        );
        assert_eq!(m.find("key akiaabcdefghijklmnop here"), Some(Hit::Pattern));
        assert_eq!(m.find("ignore previous instructions"), None);
        assert_eq!(m.find(""), None);
    }

    #[test]
    fn empty_lists_match_nothing_and_bad_regexes_are_errors() {
        assert_eq!(matcher(&[], &[]).find("anything"), None);
        let errors = Matcher::compile("t", &[], &["(".to_owned(), "a{99999999}".to_owned()])
            .expect_err("invalid");
        assert_eq!(errors.len(), 2);
    }
}
