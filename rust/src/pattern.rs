//! PEFT's module patterns (`rank_pattern`, `alpha_pattern`, a regex `target_modules`) matched
//! by a linear-time engine: Rust's `regex` crate, whose matching never backtracks, so a
//! hostile pattern such as `(.|.)*Z` costs time linear in the key, not exponential as under
//! Python's `re`. Compiling is bounded too (`SIZE_LIMIT`); what the engine cannot read
//! (look-around, back-references) is refused with its error.

use regex::{Regex, RegexBuilder};

/// The most memory one compiled pattern may take (its program and its lazy DFA's cache).
pub const SIZE_LIMIT: usize = 1 << 20;
/// The longest pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;

fn build(text: &str) -> Result<Regex, String> {
    RegexBuilder::new(text)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// Patterns in their order; `first_match` gives the first whose match the key's tail is,
/// PEFT's rule (`re.match(rf"(.*\.)?({pattern})$", key)`).
#[derive(Debug, Clone)]
pub struct ModulePatterns {
    tails: Vec<Regex>,
}

impl ModulePatterns {
    /// Compiles each pattern; `Err((index, why))` names the first that does not compile.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, (usize, String)> {
        let mut tails = Vec::with_capacity(patterns.len());
        for (i, p) in patterns.iter().enumerate() {
            let p = p.as_ref();
            if p.len() > MAX_PATTERN_LEN {
                return Err((i, format!("longer than {MAX_PATTERN_LEN} bytes")));
            }
            build(p).map_err(|e| (i, e))?; // alone first: the wrapping must not change its sense
            tails.push(build(&format!(r"\A(?:.*\.)?(?:{p})\z")).map_err(|e| (i, e))?);
        }
        Ok(Self { tails })
    }

    pub fn first_match(&self, key: &str) -> Option<usize> {
        self.tails.iter().position(|r| r.is_match(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_after_a_dot_or_the_whole_key_matches() {
        let p = ModulePatterns::new(&["q_proj", r"layers\.1\..*"]).unwrap();
        assert_eq!(p.first_match("model.layers.0.self_attn.q_proj"), Some(0));
        assert_eq!(p.first_match("q_proj"), Some(0));
        assert_eq!(p.first_match("model.layers.0.self_attn.xq_proj"), None);
        assert_eq!(p.first_match("model.layers.1.mlp.up_proj"), Some(1));
    }

    #[test]
    fn a_backtracking_pattern_is_linear_and_lookaround_is_refused() {
        let p = ModulePatterns::new(&["(.|.)*Z"]).unwrap();
        let key = "a".repeat(10_000);
        assert_eq!(p.first_match(&key), None);
        let err = ModulePatterns::new(&["ok", "(?=x)y"]).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(ModulePatterns::new(&["a)|(b"]).is_err());
        assert!(ModulePatterns::new(&["a{1000}{1000}{1000}"]).is_err()); // past the size limit
    }
}
