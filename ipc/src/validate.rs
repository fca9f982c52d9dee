//! Validated path and pattern types. A value of these types cannot hold a bad path: construction
//! (including deserialization) goes through the checks, so the helper re-validates everything the
//! gateway sends simply by decoding it.

use serde::{Deserialize, Serialize};

/// Longest accepted relative path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest accepted path component, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest accepted path, in components.
pub const MAX_DEPTH: usize = 32;
/// Mode bits a bundle entry may carry: permissions only (no setuid, setgid or sticky).
pub const ALLOWED_MODE_BITS: u32 = 0o777;

/// Why a path or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    Empty,
    TooLong,
    TooDeep,
    ComponentTooLong,
    Absolute,
    DotComponent,
    EmptyComponent,
    ForbiddenChar(char),
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::Empty => write!(f, "path is empty"),
            PathError::TooLong => write!(f, "path is longer than {MAX_PATH_BYTES} bytes"),
            PathError::TooDeep => write!(f, "path is deeper than {MAX_DEPTH} components"),
            PathError::ComponentTooLong => {
                write!(
                    f,
                    "a path component is longer than {MAX_COMPONENT_BYTES} bytes"
                )
            }
            PathError::Absolute => write!(f, "path is absolute"),
            PathError::DotComponent => write!(f, "path contains a '.' or '..' component"),
            PathError::EmptyComponent => write!(f, "path contains an empty component"),
            PathError::ForbiddenChar(c) => write!(f, "path contains forbidden character {c:?}"),
        }
    }
}

impl std::error::Error for PathError {}

fn check_chars(s: &str, allow_glob: bool) -> Result<(), PathError> {
    for c in s.chars() {
        let bad =
            c == '\0' || c == '\\' || c.is_control() || (!allow_glob && (c == '*' || c == '?'));
        if bad {
            return Err(PathError::ForbiddenChar(c));
        }
    }
    Ok(())
}

fn check_components(s: &str, allow_trailing_slash: bool) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let body = match s.strip_suffix('/') {
        Some(b) if allow_trailing_slash => b,
        _ => s,
    };
    let mut depth = 0;
    for comp in body.split('/') {
        depth += 1;
        if comp.is_empty() {
            return Err(PathError::EmptyComponent);
        }
        if comp == "." || comp == ".." {
            return Err(PathError::DotComponent);
        }
        if comp.len() > MAX_COMPONENT_BYTES {
            return Err(PathError::ComponentTooLong);
        }
    }
    if depth > MAX_DEPTH {
        return Err(PathError::TooDeep);
    }
    Ok(())
}

/// A relative path inside a job's work directory: no `..`, no `.`, no empty component, no NUL,
/// backslash or control character, not absolute, bounded length and depth.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BundlePath(String);

impl BundlePath {
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        check_chars(&s, false)?;
        check_components(&s, false)?;
        Ok(BundlePath(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent path, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<BundlePath> {
        self.0
            .rsplit_once('/')
            .map(|(p, _)| BundlePath(p.to_owned()))
    }
}

impl TryFrom<String> for BundlePath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        BundlePath::new(s)
    }
}

impl From<BundlePath> for String {
    fn from(p: BundlePath) -> String {
        p.0
    }
}

impl std::fmt::Display for BundlePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest [`PrintablePath`], in bytes: every byte of a [`MAX_PATH_BYTES`] path escaped as
/// `\xNN`, plus the `...` that marks a longer name cut short.
pub const MAX_PRINTABLE_BYTES: usize = 4 * MAX_PATH_BYTES + 3;

/// A printable rendering of a name found on disk, which may be no valid [`BundlePath`] (newline,
/// tab, `\`, invalid UTF-8, too long or too deep). Valid UTF-8 stays as it is except `\` (written
/// `\\`) and control characters (`\n`, `\t`, `\r`, else `\xNN` or `\u{NNNN}`); a byte of
/// invalid UTF-8 is written `\xNN`. Only the first [`MAX_PATH_BYTES`] bytes are rendered, then
/// `...`. So the rendering of a valid [`BundlePath`] is the path itself, and a rendering never
/// holds a control character. Decoding checks both bounds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PrintablePath(String);

impl PrintablePath {
    /// Renders raw name bytes.
    pub fn render(raw: &[u8]) -> PrintablePath {
        use std::fmt::Write;
        let cut = raw.len() > MAX_PATH_BYTES;
        let mut rest = &raw[..raw.len().min(MAX_PATH_BYTES)];
        let mut out = String::with_capacity(rest.len());
        while !rest.is_empty() {
            let (valid, bad) = match std::str::from_utf8(rest) {
                Ok(s) => (s, None),
                Err(e) => {
                    let (v, tail) = rest.split_at(e.valid_up_to());
                    // The prefix was just checked; an empty string cannot happen.
                    let v = std::str::from_utf8(v).unwrap_or_default();
                    let n = e.error_len().unwrap_or(tail.len()).max(1).min(tail.len());
                    (v, Some(&tail[..n]))
                }
            };
            for c in valid.chars() {
                let _ = match c {
                    '\\' => write!(out, "\\\\"),
                    '\n' => write!(out, "\\n"),
                    '\t' => write!(out, "\\t"),
                    '\r' => write!(out, "\\r"),
                    c if c.is_control() && c.is_ascii() => write!(out, "\\x{:02x}", c as u32),
                    c if c.is_control() => write!(out, "\\u{{{:04x}}}", c as u32),
                    c => write!(out, "{c}"),
                };
            }
            let used = valid.len();
            match bad {
                Some(b) => {
                    for byte in b {
                        let _ = write!(out, "\\x{byte:02x}");
                    }
                    rest = &rest[used + b.len()..];
                }
                None => rest = &rest[used..],
            }
        }
        if cut {
            out.push_str("...");
        }
        PrintablePath(out)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&BundlePath> for PrintablePath {
    fn from(p: &BundlePath) -> PrintablePath {
        PrintablePath::render(p.as_str().as_bytes())
    }
}

impl TryFrom<String> for PrintablePath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PRINTABLE_BYTES {
            return Err(PathError::TooLong);
        }
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(PathError::ForbiddenChar(c));
        }
        Ok(PrintablePath(s))
    }
}

impl From<PrintablePath> for String {
    fn from(p: PrintablePath) -> String {
        p.0
    }
}

impl std::fmt::Display for PrintablePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An output pattern (see `docs/manifest.md`):
/// - no `/` (`*.png`, `result.txt`): matches the file name at any depth;
/// - ends with `/` (`results/`): everything under that directory;
/// - otherwise anchored at the work directory; `*` and `?` stay within one component and a `**`
///   component matches zero or more components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutputPattern(String);

impl OutputPattern {
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        check_chars(&s, true)?;
        check_components(&s, true)?;
        Ok(OutputPattern(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the relative path `path` (components separated by `/`) is selected.
    pub fn matches(&self, path: &str) -> bool {
        let path: Vec<&str> = path.split('/').collect();
        if let Some(dir) = self.0.strip_suffix('/') {
            let pat: Vec<&str> = dir.split('/').collect();
            // Everything strictly below a directory matching `dir`.
            return prefixes_matched(&pat, &path)[1..path.len()].contains(&true);
        }
        if !self.0.contains('/') {
            return path
                .last()
                .is_some_and(|name| glob_component(self.0.as_bytes(), name.as_bytes()));
        }
        let pat: Vec<&str> = self.0.split('/').collect();
        prefixes_matched(&pat, &path)[path.len()]
    }

    /// The fixed directory prefix of an anchored pattern (no glob characters), used to avoid
    /// walking unrelated directories. Empty when the pattern can match anywhere.
    pub fn literal_prefix(&self) -> Vec<&str> {
        let body = self.0.strip_suffix('/').unwrap_or(&self.0);
        if !body.contains('/') && !self.0.ends_with('/') {
            return Vec::new();
        }
        let comps: Vec<&str> = body.split('/').collect();
        let mut out = Vec::new();
        // The last component of a file pattern names the file, not a directory.
        let dirs = if self.0.ends_with('/') {
            &comps[..]
        } else {
            &comps[..comps.len() - 1]
        };
        for c in dirs {
            if c.contains('*') || c.contains('?') {
                break;
            }
            out.push(*c);
        }
        out
    }
}

impl TryFrom<String> for OutputPattern {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        OutputPattern::new(s)
    }
}

impl From<OutputPattern> for String {
    fn from(p: OutputPattern) -> String {
        p.0
    }
}

/// Entry `j` tells whether `pat` matches exactly the first `j` components of `path`.
///
/// Dynamic programming over (pattern component, path component): each pair is compared at most
/// once, whatever the number of `**` components. Backtracking over `**` is exponential in their
/// number (`**/**/.../x` against a deep tree never finished), and the helper runs this on names
/// a job created (regression: `ipc/tests/fuzz_regressions.rs`).
fn prefixes_matched(pat: &[&str], path: &[&str]) -> Vec<bool> {
    let mut reach = vec![false; path.len() + 1];
    reach[0] = true;
    for p in pat {
        if *p == "**" {
            // Zero or more components: every position at or after a reachable one is reachable.
            let mut seen = false;
            for r in &mut reach {
                seen |= *r;
                *r = seen;
            }
        } else {
            for j in (1..=path.len()).rev() {
                reach[j] = reach[j - 1] && glob_component(p.as_bytes(), path[j - 1].as_bytes());
            }
            reach[0] = false;
        }
    }
    reach
}

/// Matches one component against a glob with `*` (any run) and `?` (one byte). Iterative with a
/// single backtrack point, so it is linear-ish and cannot blow the stack.
fn glob_component(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        // `*` first: a name may itself contain `*`, which must not be taken as a literal match
        // of the pattern's star (found by fuzzing: `*` did not select a file named `**`).
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

/// Strips everything but permission bits from a mode.
pub fn sanitize_mode(mode: u32) -> u32 {
    mode & ALLOWED_MODE_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_names_that_cannot_travel_then_their_rendering_is_printable_and_escaped() {
        let cases: [(&[u8], &str); 7] = [
            (b"res/a.txt", "res/a.txt"),
            (b"a\n1", "a\\n1"),
            (b"tab\tx", "tab\\tx"),
            (b"back\\slash", "back\\\\slash"),
            (b"star*q?", "star*q?"),
            (b"bad\xff\xfe!", "bad\\xff\\xfe!"),
            (b"\x1b[2J\xc2\x85", "\\x1b[2J\\u{0085}"),
        ];
        for (raw, want) in cases {
            let p = PrintablePath::render(raw);
            assert_eq!(p.as_str(), want, "{raw:?}");
            assert!(PrintablePath::try_from(p.as_str().to_owned()).is_ok());
        }
        let long = PrintablePath::render(&[0xff; MAX_PATH_BYTES + 10]);
        assert_eq!(long.as_str().len(), MAX_PRINTABLE_BYTES);
        assert!(long.as_str().ends_with("..."));
        assert!(PrintablePath::try_from("a\nb".to_owned()).is_err());
        assert!(PrintablePath::try_from(String::new()).is_err());
    }

    #[test]
    fn given_traversal_or_absolute_paths_then_they_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/b/",
            "a\\b",
            "a\0b",
            "a\nb",
            ".",
            "..",
        ] {
            assert!(BundlePath::new(bad).is_err(), "{bad:?} accepted");
        }
        let long = "a".repeat(MAX_COMPONENT_BYTES + 1);
        assert_eq!(BundlePath::new(long), Err(PathError::ComponentTooLong));
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert_eq!(BundlePath::new(deep), Err(PathError::TooDeep));
    }

    #[test]
    fn given_ordinary_relative_paths_then_they_are_accepted() {
        for good in [
            "main.py",
            "src/util.py",
            "a b/c-d_e.txt",
            "ünïcode/ß",
            ".hidden",
            "a/.b",
        ] {
            assert!(BundlePath::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn given_a_bundle_path_when_deserialized_then_it_is_validated_again() {
        let bytes =
            bincode::serde::encode_to_vec("../escape", bincode::config::standard()).unwrap();
        let r: Result<(BundlePath, usize), _> =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
        assert!(r.is_err());
    }

    #[test]
    fn given_a_bare_name_pattern_then_it_matches_at_any_depth() {
        let p = OutputPattern::new("*.png").unwrap();
        assert!(p.matches("a.png"));
        assert!(p.matches("plots/deep/b.png"));
        assert!(!p.matches("a.png.txt"));
        assert!(!p.matches("png"));
    }

    #[test]
    fn given_a_directory_pattern_then_it_matches_everything_below() {
        let p = OutputPattern::new("results/").unwrap();
        assert!(p.matches("results/a.csv"));
        assert!(p.matches("results/x/y/z"));
        assert!(!p.matches("results"));
        assert!(!p.matches("other/results/a"));
        assert_eq!(p.literal_prefix(), vec!["results"]);
    }

    #[test]
    fn given_an_anchored_pattern_then_star_stays_in_one_component() {
        let p = OutputPattern::new("out/*.csv").unwrap();
        assert!(p.matches("out/a.csv"));
        assert!(!p.matches("out/sub/a.csv"));
        assert!(!p.matches("x/out/a.csv"));
        let p = OutputPattern::new("out/**/*.csv").unwrap();
        assert!(p.matches("out/a.csv"));
        assert!(p.matches("out/sub/deeper/a.csv"));
        let p = OutputPattern::new("**").unwrap();
        assert!(p.matches("anything/at/all"));
    }

    #[test]
    fn given_patterns_with_traversal_then_they_are_refused() {
        for bad in ["../x", "/abs/*", "a/../b", "a\\*", "", "a//b"] {
            assert!(OutputPattern::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn given_a_pathological_glob_then_matching_terminates() {
        let p = OutputPattern::new(format!("{}b", "*a".repeat(40))).unwrap();
        assert!(!p.matches(&"a".repeat(200)));
    }

    #[test]
    fn given_modes_with_special_bits_then_they_are_stripped() {
        assert_eq!(sanitize_mode(0o4755), 0o755);
        assert_eq!(sanitize_mode(0o2777), 0o777);
        assert_eq!(sanitize_mode(0o1700), 0o700);
    }
}
