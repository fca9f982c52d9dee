//! The `output_pattern` fuzz check: an output pattern from a manifest against paths the sandbox may contain.
//!
//! Input: the first line is the pattern, every further line (at most 8) a path. The pattern goes
//! through [`OutputPattern::new`] exactly as a manifest's does; paths are arbitrary strings,
//! because the helper matches names a hostile job created.
//!
//! Properties, for every accepted pattern and every path:
//! - matching never panics and terminates fast (libFuzzer's `-timeout` catches blow-ups);
//! - it agrees with a small reference matcher written independently below;
//! - a pattern without `/` tests only the basename, at any depth;
//! - a pattern without glob characters selects exactly the path it spells (so a literal pattern
//!   can never select `..`, an absolute path or anything outside its own name);
//! - a match starts with [`OutputPattern::literal_prefix`], and a directory pattern (`dir/`)
//!   never selects the directory itself;
//! - matching a path that is not a valid [`BundlePath`] needs a glob: literal components only
//!   match themselves, and a pattern cannot hold `.`, `..` or empty components.
//!
//! Compiled into the fuzz target and into `ipc/tests/fuzz_regressions.rs`, which replays the
//! checked-in seeds.

use sandrun_ipc::{BundlePath, OutputPattern};

/// Runs one input; returns how many (pattern, path) pairs matched.
pub fn check(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let mut lines = text.split('\n');
    let Some(Ok(pattern)) = lines.next().map(OutputPattern::new) else {
        return 0;
    };
    lines
        .take(8)
        .filter(|path| check_pair(&pattern, path))
        .count()
}

fn check_pair(pattern: &OutputPattern, path: &str) -> bool {
    let p = pattern.as_str();
    let matched = pattern.matches(path);
    if p.len() + path.len() <= 512 {
        assert_eq!(matched, reference::matches(p, path), "{p:?} vs {path:?}");
    }
    let has_glob = p.contains('*') || p.contains('?');
    let anchored = p.contains('/') && !p.ends_with('/');
    if !p.contains('/') {
        let base = path.rsplit('/').next().unwrap_or(path);
        assert_eq!(matched, pattern.matches(base), "{p:?}: not by basename");
        assert_eq!(
            matched,
            pattern.matches(&format!("deeper/{path}")),
            "{p:?}: depth changed the result for {path:?}"
        );
        if !has_glob {
            assert_eq!(matched, base == p, "literal {p:?} vs {path:?}");
        }
    }
    if anchored && !has_glob {
        assert_eq!(matched, path == p, "literal {p:?} vs {path:?}");
    }
    if matched {
        let prefix = pattern.literal_prefix();
        let comps: Vec<&str> = path.split('/').collect();
        assert!(
            comps.len() >= prefix.len() && comps[..prefix.len()] == prefix[..],
            "{p:?} matched {path:?} outside its literal prefix {prefix:?}"
        );
        if p.ends_with('/') {
            assert!(comps.len() >= 2, "{p:?} selected {path:?} itself");
        }
        if anchored && BundlePath::new(path).is_err() {
            assert!(has_glob, "literal {p:?} matched invalid path {path:?}");
        }
    }
    matched
}

/// An independent matcher written from the documented semantics: memoized recursion over
/// (pattern, path) positions, for components and for bytes within a component.
mod reference {
    use std::collections::HashMap;

    pub fn matches(pattern: &str, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').collect();
        if let Some(dir) = pattern.strip_suffix('/') {
            // `dir/` selects whatever is strictly below a directory matching `dir`.
            let pat: Vec<&str> = dir.split('/').collect();
            return (1..comps.len()).any(|n| components(&pat, &comps[..n]));
        }
        if !pattern.contains('/') {
            // Only the file name, at any depth.
            return comps.last().is_some_and(|name| glob(pattern, name));
        }
        let pat: Vec<&str> = pattern.split('/').collect();
        components(&pat, &comps)
    }

    fn components(pat: &[&str], comps: &[&str]) -> bool {
        fn go(
            pat: &[&str],
            comps: &[&str],
            i: usize,
            j: usize,
            memo: &mut HashMap<(usize, usize), bool>,
        ) -> bool {
            if let Some(&known) = memo.get(&(i, j)) {
                return known;
            }
            let result = if i == pat.len() {
                j == comps.len()
            } else if pat[i] == "**" {
                // Zero components, or one more and stay on `**`.
                go(pat, comps, i + 1, j, memo)
                    || (j < comps.len() && go(pat, comps, i, j + 1, memo))
            } else {
                j < comps.len() && glob(pat[i], comps[j]) && go(pat, comps, i + 1, j + 1, memo)
            };
            memo.insert((i, j), result);
            result
        }
        go(pat, comps, 0, 0, &mut HashMap::new())
    }

    /// `*` is any run of bytes, `?` exactly one byte, anything else itself.
    fn glob(pat: &str, name: &str) -> bool {
        fn go(
            p: &[u8],
            s: &[u8],
            i: usize,
            j: usize,
            memo: &mut HashMap<(usize, usize), bool>,
        ) -> bool {
            if let Some(&known) = memo.get(&(i, j)) {
                return known;
            }
            let result = match p.get(i) {
                None => j == s.len(),
                Some(b'*') => go(p, s, i + 1, j, memo) || (j < s.len() && go(p, s, i, j + 1, memo)),
                Some(b'?') => j < s.len() && go(p, s, i + 1, j + 1, memo),
                Some(&c) => s.get(j) == Some(&c) && go(p, s, i + 1, j + 1, memo),
            };
            memo.insert((i, j), result);
            result
        }
        go(pat.as_bytes(), name.as_bytes(), 0, 0, &mut HashMap::new())
    }
}
