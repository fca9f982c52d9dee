//! The job manifest: strict JSON in, a validated [`Manifest`] out (see `docs/manifest.md`).
//!
//! Parsing happens in two steps. [`RawManifest`] mirrors the JSON with `deny_unknown_fields`, and
//! `serde_path_to_error` names the field of any type error. [`Manifest::from_raw`] then checks
//! every value against the [`ManifestPolicy`] and the uploaded files. Every error message starts
//! with `manifest.<field>`.

use std::collections::BTreeMap;

use sandrun_ipc::{rules, BundlePath, OutputPattern};
use serde::{Deserialize, Serialize};

use crate::bundle::BundleBuilder;

/// Default wall-clock timeout in seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 300;
/// Default memory limit in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Default CPU time in seconds.
pub const DEFAULT_CPU_SECONDS: u64 = 10;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Most arguments accepted.
pub const MAX_ARGS: usize = 256;
/// Most environment variables accepted.
pub const MAX_ENV: usize = 64;
/// Most output patterns accepted.
pub const MAX_OUTPUTS: usize = 64;
/// Longest argument, environment name or value, in bytes.
pub const MAX_STRING_BYTES: usize = 4096;

// The gateway's counts are within the helper's ([`rules`]): argv is the interpreter, the
// entrypoint and the args.
const _: () = assert!(
    MAX_ARGS + 2 <= rules::MAX_ARGS
        && MAX_ENV <= rules::MAX_ENV
        && MAX_OUTPUTS <= rules::MAX_OUTPUT_PATTERNS
);

/// Entry points tried, in order, when the manifest names none, with their interpreters.
pub const AUTO_ENTRYPOINTS: [(&str, &str); 3] = [
    ("main.py", "python3"),
    ("index.js", "node"),
    ("run.sh", "bash"),
];

/// Environment names the sandbox sets itself; a manifest cannot override them. The helper's
/// list, from the one place both use.
pub use sandrun_ipc::rules::RESERVED_ENV;

/// What the deployment allows. The helper clamps again; this gives the client a clear 400 first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestPolicy {
    /// Interpreter names the helper allows (`python3`, `node`, `bash`).
    pub interpreters: Vec<String>,
    /// Environment template names jobs may use; empty: every template the helper has built.
    /// (Whether the template is built is asked of the helper at submit.)
    pub environments: Vec<String>,
    pub max_timeout_s: u64,
    pub max_memory_mb: u64,
    pub max_cpu_seconds: u64,
}

impl Default for ManifestPolicy {
    fn default() -> Self {
        ManifestPolicy {
            interpreters: ["python3", "node", "bash"].map(String::from).to_vec(),
            environments: Vec::new(),
            max_timeout_s: 3600,
            max_memory_mb: 2048,
            max_cpu_seconds: 60,
        }
    }
}

/// A validated manifest. Every default is filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// A file present in the upload.
    pub entrypoint: BundlePath,
    /// A name from [`ManifestPolicy::interpreters`].
    pub interpreter: String,
    /// A valid template name ([`rules::is_template_name`]), from
    /// [`ManifestPolicy::environments`] when that list is not empty.
    pub environment: Option<String>,
    pub args: Vec<String>,
    /// Sorted by name, names unique.
    pub env: Vec<(String, String)>,
    pub outputs: Vec<OutputPattern>,
    pub timeout_s: u64,
    pub memory_mb: u64,
    pub cpu_seconds: u64,
    /// Python requirements to install from the helper's wheelhouse, one per entry, each checked
    /// by [`rules::check_requirement`]; empty for none.
    pub requirements: Vec<String>,
}

/// A manifest the client got wrong. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The field, as `manifest.<name>` (or `manifest` for the document as a whole).
    pub field: String,
    pub problem: String,
}

impl ManifestError {
    fn new(field: &str, problem: impl Into<String>) -> Self {
        let field = if field.is_empty() {
            "manifest".to_owned()
        } else {
            format!("manifest.{field}")
        };
        ManifestError {
            field,
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ManifestError {}

/// The manifest exactly as the client wrote it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    entrypoint: Option<String>,
    interpreter: Option<String>,
    environment: Option<String>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    outputs: Option<Vec<String>>,
    timeout: Option<u64>,
    memory_mb: Option<u64>,
    cpu_seconds: Option<u64>,
    requirements: Option<serde_json::Value>,
    /// The job's standard input as text (the `stdin` form part carries bytes). Not part of
    /// the canonical manifest: the job hash covers it on a line of its own.
    stdin: Option<String>,
}

impl RawManifest {
    /// The entry point as written, if any.
    pub fn entrypoint(&self) -> Option<&str> {
        self.entrypoint.as_deref()
    }

    /// Takes the `stdin` field out (the upload checks its size and where else stdin came from).
    pub fn take_stdin(&mut self) -> Option<String> {
        self.stdin.take()
    }

    /// Parses JSON, naming the field of any error.
    pub fn parse(json: &[u8]) -> Result<RawManifest, ManifestError> {
        if json.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::new(
                "",
                format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw: RawManifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = known_path(&e.path().to_string());
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ManifestError::new(&field, json_syntax(&inner))
            } else {
                ManifestError::new(&field, inner.to_string())
            }
        })?;
        de.end()
            .map_err(|e| ManifestError::new("", json_syntax(&e)))?;
        Ok(raw)
    }
}

/// The part of a serde path that names fields or indexes: unknown (`?`) segments, which a
/// syntax error leaves where it could not tell, are dropped (`args.?` is `args`).
fn known_path(path: &str) -> String {
    let kept: Vec<&str> = path
        .split('.')
        .filter(|s| !s.is_empty() && *s != "?")
        .collect();
    kept.join(".")
}

/// A JSON syntax error with its position, as the client can find it in its text.
fn json_syntax(e: &serde_json::Error) -> String {
    // serde_json's message ends with " at line L column C"; say it once, first.
    let text = e.to_string();
    let what = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(what, _)| what);
    format!(
        "not valid JSON at line {} column {}: {what}",
        e.line(),
        e.column()
    )
}

impl Manifest {
    /// Checks `raw` against `policy` and the uploaded files.
    pub fn from_raw(
        raw: RawManifest,
        policy: &ManifestPolicy,
        files: &BundleBuilder,
    ) -> Result<Manifest, ManifestError> {
        let requirements = requirements(raw.requirements, files)?;
        let (entrypoint, auto_interpreter) = entrypoint(raw.entrypoint, files)?;
        let interpreter = interpreter(raw.interpreter, &entrypoint, auto_interpreter, policy)?;
        let environment = environment(raw.environment, policy)?;
        let env = env(raw.env.unwrap_or_default(), environment.is_some())?;
        let manifest = Manifest {
            entrypoint,
            interpreter,
            environment,
            args: args(raw.args.unwrap_or_default())?,
            env,
            outputs: outputs(raw.outputs.unwrap_or_default())?,
            timeout_s: ranged(
                "timeout",
                raw.timeout,
                DEFAULT_TIMEOUT_S,
                policy.max_timeout_s,
            )?,
            memory_mb: ranged(
                "memory_mb",
                raw.memory_mb,
                DEFAULT_MEMORY_MB,
                policy.max_memory_mb,
            )?,
            cpu_seconds: ranged(
                "cpu_seconds",
                raw.cpu_seconds,
                DEFAULT_CPU_SECONDS,
                policy.max_cpu_seconds,
            )?,
            requirements,
        };
        manifest.check_argv_env_size()?;
        Ok(manifest)
    }

    /// The helper's bound on argv and env together ([`rules::MAX_ARGV_ENV_BYTES`]).
    fn check_argv_env_size(&self) -> Result<(), ManifestError> {
        if rules::argv_env_bytes(&self.argv(), &self.env) > rules::MAX_ARGV_ENV_BYTES {
            return Err(ManifestError::new(
                "args",
                format!(
                    "args and env together exceed {} bytes",
                    rules::MAX_ARGV_ENV_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The canonical JSON form hashed into the job hash: every field present, in the fixed order
    /// of `docs/manifest.md`, `env` as an object sorted by name, no whitespace.
    pub fn canonical_json(&self) -> Vec<u8> {
        let canonical = CanonicalManifest {
            entrypoint: self.entrypoint.as_str(),
            interpreter: &self.interpreter,
            environment: self.environment.as_deref(),
            args: &self.args,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            outputs: self.outputs.iter().map(OutputPattern::as_str).collect(),
            timeout: self.timeout_s,
            memory_mb: self.memory_mb,
            cpu_seconds: self.cpu_seconds,
            requirements: &self.requirements,
        };
        // Invariant: the struct holds only strings, integers, sequences and string-keyed maps,
        // which serde_json always serializes.
        serde_json::to_vec(&canonical).expect("canonical manifest serializes")
    }

    /// The command line: `[interpreter, entrypoint, args...]`.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![self.interpreter.clone(), self.entrypoint.to_string()];
        argv.extend(self.args.iter().cloned());
        argv
    }
}

#[derive(Serialize)]
struct CanonicalManifest<'a> {
    entrypoint: &'a str,
    interpreter: &'a str,
    environment: Option<&'a str>,
    args: &'a [String],
    env: BTreeMap<&'a str, &'a str>,
    outputs: Vec<&'a str>,
    timeout: u64,
    memory_mb: u64,
    cpu_seconds: u64,
    /// Only when there are requirements, so a job without them hashes exactly as before.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    requirements: &'a [String],
}

/// The upload's file that `"requirements": true` installs.
pub const REQUIREMENTS_FILE: &str = "requirements.txt";

/// The original Sandrun's form, `"requirements": "requirements.txt"`: a one-word string that is
/// the path of a file in the upload names that file (read as requirements-file text). A word
/// ending in `.txt` that is not in the upload, or a dependency file of another installer
/// (`package.json`, `Gemfile`, ...), is refused here rather than read as a distribution name.
fn requirements_file_name<'a>(
    s: &'a str,
    files: &BundleBuilder,
) -> Result<Option<&'a str>, ManifestError> {
    let word = s.trim();
    if word.is_empty() || word.contains(char::is_whitespace) {
        return Ok(None);
    }
    let base = word.rsplit('/').next().unwrap_or(word);
    let other = [
        ("package.json", "npm"),
        ("package-lock.json", "npm"),
        ("Gemfile", "bundler"),
        ("Gemfile.lock", "bundler"),
        ("Pipfile", "pipenv"),
        ("pyproject.toml", "a Python build backend"),
    ];
    if let Some((_, tool)) = other.iter().find(|(f, _)| *f == base) {
        return Err(ManifestError::new(
            "requirements",
            format!(
                "{word:?} is a dependency file for {tool}, which jobs do not run; per-job \
                 requirements are pip requirements from the operator's wheelhouse (npm packages \
                 come from an environment template: GET /environments)"
            ),
        ));
    }
    if files.file_data(word).is_some() {
        return Ok(Some(word));
    }
    if word.ends_with(".txt") || word.contains('/') {
        return Err(ManifestError::new(
            "requirements",
            format!("names the file {word:?}, which the upload does not have"),
        ));
    }
    Ok(None)
}

/// An upload's file as UTF-8 text, for `requirements`.
fn upload_text<'a>(files: &'a BundleBuilder, name: &str) -> Result<&'a str, ManifestError> {
    let data: &[u8] = files.file_data(name).map_or(&[], |d| d);
    std::str::from_utf8(data)
        .map_err(|_| ManifestError::new("requirements", format!("{name} is not UTF-8")))
}

/// `requirements`: a list of requirement lines, or one string in requirements-file syntax
/// (blank lines and `#` comment lines are dropped), or one string naming a file of the upload
/// (the original's `"requirements.txt"`, see [`requirements_file_name`]), or `true` for the
/// upload's top-level `requirements.txt`, both read the same way. `null`, `false`, `[]`, `""` and `{}` ask for nothing.
/// Every line must pass [`rules::check_requirements`] (names, version specifiers and
/// `--hash=sha256:` only).
fn requirements(
    v: Option<serde_json::Value>,
    files: &BundleBuilder,
) -> Result<Vec<String>, ManifestError> {
    use serde_json::Value;
    let field = "requirements";
    let text_lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let lines: Vec<String> = match v {
        None | Some(Value::Null | Value::Bool(false)) => Vec::new(),
        Some(Value::Object(o)) if o.is_empty() => Vec::new(),
        Some(Value::String(s)) => match requirements_file_name(&s, files)? {
            Some(name) => text_lines(upload_text(files, name)?),
            None => text_lines(&s),
        },
        Some(Value::Bool(true)) => {
            if files.file_data(REQUIREMENTS_FILE).is_none() {
                return Err(ManifestError::new(
                    field,
                    format!("true, but the upload has no top-level {REQUIREMENTS_FILE}"),
                ));
            }
            text_lines(upload_text(files, REQUIREMENTS_FILE)?)
        }
        Some(Value::Array(a)) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(ManifestError::new(
                    &format!("{field}[{i}]"),
                    "must be a string",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ManifestError::new(
                field,
                "must be a list of requirement strings or one requirements-file string",
            ))
        }
    };
    if lines.len() > rules::MAX_REQUIREMENTS {
        return Err(ManifestError::new(
            field,
            format!("more than {} requirements", rules::MAX_REQUIREMENTS),
        ));
    }
    rules::check_requirements(&lines)
        .map_err(|(i, e)| ManifestError::new(&format!("{field}[{i}]"), e.to_string()))?;
    Ok(lines)
}

/// The entry point and, when it was auto-detected, its interpreter.
fn entrypoint(
    given: Option<String>,
    files: &BundleBuilder,
) -> Result<(BundlePath, Option<&'static str>), ManifestError> {
    let Some(given) = given else {
        return AUTO_ENTRYPOINTS
            .iter()
            .find(|(name, _)| files.has_file(name))
            .map(|(name, interp)| BundlePath::new(*name).map(|p| (p, Some(*interp))))
            .transpose()
            .map_err(|e| ManifestError::new("entrypoint", e.to_string()))?
            .ok_or_else(|| {
                ManifestError::new(
                    "entrypoint",
                    "required: the upload has no main.py, index.js or run.sh to default to",
                )
            });
    };
    let trimmed = given.strip_prefix("./").unwrap_or(&given);
    let path = BundlePath::new(trimmed)
        .map_err(|e| ManifestError::new("entrypoint", format!("{given:?}: {e}")))?;
    if !files.has_file(path.as_str()) {
        return Err(ManifestError::new(
            "entrypoint",
            format!("{given:?} is not a file in the upload"),
        ));
    }
    Ok((path, None))
}

/// The interpreter named, or the default for the entry point's extension; it must be allowed.
fn interpreter(
    given: Option<String>,
    entrypoint: &BundlePath,
    auto: Option<&'static str>,
    policy: &ManifestPolicy,
) -> Result<String, ManifestError> {
    let name = match given
        .as_deref()
        .or(auto)
        .or_else(|| default_interpreter(entrypoint))
    {
        Some(name) => name.to_owned(),
        None => {
            return Err(ManifestError::new(
                "interpreter",
                format!(
                    "required: no default interpreter for {:?}",
                    entrypoint.as_str()
                ),
            ))
        }
    };
    if !policy.interpreters.contains(&name) {
        return Err(ManifestError::new(
            "interpreter",
            format!("{name:?} is not one of {:?}", policy.interpreters),
        ));
    }
    Ok(name)
}

/// `.py` → python3, `.js` → node, `.sh` → bash.
pub fn default_interpreter(entrypoint: &BundlePath) -> Option<&'static str> {
    let (_, ext) = entrypoint.as_str().rsplit_once('.')?;
    match ext {
        "py" => Some("python3"),
        "js" | "mjs" | "cjs" => Some("node"),
        "sh" => Some("bash"),
        _ => None,
    }
}

fn environment(
    given: Option<String>,
    policy: &ManifestPolicy,
) -> Result<Option<String>, ManifestError> {
    match given {
        Some(name) if !rules::is_template_name(&name) => Err(ManifestError::new(
            "environment",
            format!("{name:?} is not a template name ([A-Za-z0-9._-], no leading dot, at most 64)"),
        )),
        Some(name) if !policy.environments.is_empty() && !policy.environments.contains(&name) => {
            Err(ManifestError::new(
                "environment",
                format!("{name:?} is not one of {:?}", policy.environments),
            ))
        }
        other => Ok(other),
    }
}

fn args(args: Vec<String>) -> Result<Vec<String>, ManifestError> {
    if args.len() > MAX_ARGS {
        return Err(ManifestError::new(
            "args",
            format!("more than {MAX_ARGS} arguments"),
        ));
    }
    for (i, arg) in args.iter().enumerate() {
        check_string(&format!("args[{i}]"), arg)?;
    }
    Ok(args)
}

fn env(
    env: BTreeMap<String, String>,
    template: bool,
) -> Result<Vec<(String, String)>, ManifestError> {
    if env.len() > MAX_ENV {
        return Err(ManifestError::new(
            "env",
            format!("more than {MAX_ENV} variables"),
        ));
    }
    for (name, value) in &env {
        let field = format!("env.{name}");
        check_env_name(&field, name, template)?;
        check_string(&field, value)?;
    }
    Ok(env.into_iter().collect())
}

/// The helper's rule for names ([`rules::check_job_env_name`]), so the two never disagree: with
/// a template, `PYTHONPATH` and `NODE_PATH` are the template's and refused here with a 400.
fn check_env_name(field: &str, name: &str, template: bool) -> Result<(), ManifestError> {
    rules::check_job_env_name(name, template).map_err(|e| ManifestError::new(field, e.to_string()))
}

fn check_string(field: &str, s: &str) -> Result<(), ManifestError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(ManifestError::new(
            field,
            format!("longer than {MAX_STRING_BYTES} bytes"),
        ));
    }
    if s.contains('\0') {
        return Err(ManifestError::new(field, "contains a NUL byte"));
    }
    Ok(())
}

fn outputs(patterns: Vec<String>) -> Result<Vec<OutputPattern>, ManifestError> {
    if patterns.len() > MAX_OUTPUTS {
        return Err(ManifestError::new(
            "outputs",
            format!("more than {MAX_OUTPUTS} patterns"),
        ));
    }
    patterns
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            OutputPattern::new(p.clone())
                .map_err(|e| ManifestError::new(&format!("outputs[{i}]"), format!("{p:?}: {e}")))
        })
        .collect()
}

/// `given` or the default (lowered to `max` if the policy is stricter), within `1..=max`.
fn ranged(field: &str, given: Option<u64>, default: u64, max: u64) -> Result<u64, ManifestError> {
    let value = given.unwrap_or(default.min(max));
    if value == 0 || value > max {
        return Err(ManifestError::new(
            field,
            format!("must be between 1 and {max}"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::bundle::BundleCaps;

    fn files(names: &[&str]) -> BundleBuilder {
        let mut b = BundleBuilder::new(BundleCaps {
            max_entries: 100,
            max_bytes: 1 << 20,
        });
        for n in names {
            b.add_file(BundlePath::new(*n).unwrap(), 0o644, Bytes::new())
                .unwrap();
        }
        b
    }

    fn parse_with(json: &str, with: &[(&str, &[u8])]) -> Result<Manifest, ManifestError> {
        let mut b = BundleBuilder::new(BundleCaps {
            max_entries: 100,
            max_bytes: 1 << 20,
        });
        for (n, data) in with {
            b.add_file(
                BundlePath::new(*n).unwrap(),
                0o644,
                Bytes::copy_from_slice(data),
            )
            .unwrap();
        }
        let raw = RawManifest::parse(json.as_bytes())?;
        Manifest::from_raw(raw, &ManifestPolicy::default(), &b)
    }

    fn parse(json: &str, names: &[&str]) -> Result<Manifest, ManifestError> {
        let raw = RawManifest::parse(json.as_bytes())?;
        Manifest::from_raw(raw, &ManifestPolicy::default(), &files(names))
    }

    fn err(json: &str) -> String {
        parse(json, &["main.py", "tool.rb"])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn given_a_json_syntax_error_then_it_says_line_and_column_and_no_question_mark() {
        let e =
            RawManifest::parse(b"{\n  \"entrypoint\": \"main.py\",\n  \"args\": [\"a\" \"b\"]\n}")
                .unwrap_err()
                .to_string();
        assert!(!e.contains('?'), "{e}");
        assert!(e.contains("line 3 column"), "{e}");
        assert!(e.starts_with("manifest.args: not valid JSON"), "{e}");
        let e = RawManifest::parse(b"{\"entrypoint\": ")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("manifest.entrypoint: not valid JSON at line 1 column 15"),
            "{e}"
        );
        let e = RawManifest::parse(b"{} x").unwrap_err().to_string();
        assert!(
            e.starts_with("manifest: not valid JSON at line 1 column 4"),
            "{e}"
        );
    }

    #[test]
    fn given_a_minimal_manifest_then_defaults_are_filled_in() {
        let m = parse(r#"{"entrypoint":"main.py"}"#, &["main.py"]).unwrap();
        assert_eq!(m.interpreter, "python3");
        assert_eq!((m.timeout_s, m.memory_mb, m.cpu_seconds), (300, 512, 10));
        assert_eq!(m.argv(), ["python3", "main.py"]);
    }

    #[test]
    fn given_no_entrypoint_then_main_py_index_js_run_sh_are_detected_in_order() {
        assert_eq!(
            parse("{}", &["run.sh", "index.js"]).unwrap().argv(),
            ["node", "index.js"]
        );
        assert_eq!(
            parse("{}", &["run.sh", "x.py"]).unwrap().argv(),
            ["bash", "run.sh"]
        );
        assert_eq!(
            parse("{}", &["main.py", "run.sh"]).unwrap().interpreter,
            "python3"
        );
        let e = parse("{}", &["x.py"]).unwrap_err();
        assert_eq!(e.field, "manifest.entrypoint");
    }

    #[test]
    fn given_an_unknown_field_then_the_error_names_it() {
        let e = err(r#"{"entrypoint":"main.py","memory":5}"#);
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn given_a_wrong_type_then_the_error_names_the_field() {
        let e = err(r#"{"entrypoint":"main.py","timeout":"60"}"#);
        assert!(e.starts_with("manifest.timeout:"), "{e}");
        let e = err(r#"{"entrypoint":"main.py","args":[1]}"#);
        assert!(e.starts_with("manifest.args"), "{e}");
        let e = err(r#"{"entrypoint":"main.py","memory_mb":-1}"#);
        assert!(e.starts_with("manifest.memory_mb:"), "{e}");
    }

    #[test]
    fn given_out_of_range_limits_then_the_error_names_the_field_and_range() {
        assert_eq!(
            err(r#"{"entrypoint":"main.py","memory_mb":4096}"#),
            "manifest.memory_mb: must be between 1 and 2048"
        );
        assert_eq!(
            err(r#"{"entrypoint":"main.py","timeout":3601}"#),
            "manifest.timeout: must be between 1 and 3600"
        );
        assert_eq!(
            err(r#"{"entrypoint":"main.py","cpu_seconds":0}"#),
            "manifest.cpu_seconds: must be between 1 and 60"
        );
    }

    #[test]
    fn given_forbidden_env_names_then_each_is_refused_naming_it() {
        let reserved = sandrun_ipc::rules::RESERVED_ENV;
        for name in ["LD_PRELOAD", "1X", "A-B", ""].iter().chain(&reserved) {
            let e = err(&format!(
                r#"{{"entrypoint":"main.py","env":{{"{name}":"x"}}}}"#
            ));
            assert!(e.starts_with(&format!("manifest.env.{name}:")), "{e}");
        }
        let m = parse(
            r#"{"entrypoint":"main.py","env":{"B":"2","A_1":"1"}}"#,
            &["main.py"],
        );
        assert_eq!(
            m.unwrap().env,
            [("A_1".into(), "1".into()), ("B".into(), "2".into())]
        );
    }

    #[test]
    fn given_requirements_then_good_lines_are_kept_and_bad_ones_refused_naming_the_entry() {
        let m = parse(
            r#"{"entrypoint":"main.py","requirements":["six==1.17.0","alpha"]}"#,
            &["main.py"],
        )
        .unwrap();
        assert_eq!(m.requirements, ["six==1.17.0", "alpha"]);
        let m = parse(
            r##"{"entrypoint":"main.py","requirements":"# pinned\nsix==1.17.0\n\nalpha\n"}"##,
            &["main.py"],
        )
        .unwrap();
        assert_eq!(m.requirements, ["six==1.17.0", "alpha"]);
        for empty in ["[]", "null", "\"\"", "{}"] {
            let m = parse(
                &format!(r#"{{"entrypoint":"main.py","requirements":{empty}}}"#),
                &["main.py"],
            )
            .unwrap();
            assert!(m.requirements.is_empty(), "{empty}");
        }
        for (bad, field) in [
            (r#"["six","-e ."]"#, "manifest.requirements[1]:"),
            (
                r#"["--index-url https://evil"]"#,
                "manifest.requirements[0]:",
            ),
            (
                r#"["six @ https://x/six.whl"]"#,
                "manifest.requirements[0]:",
            ),
            (r#"["-r other.txt"]"#, "manifest.requirements[0]:"),
            (r#"[1]"#, "manifest.requirements[0]:"),
            ("true", "manifest.requirements:"),
            ("3", "manifest.requirements:"),
            (r#""six\n/etc/passwd""#, "manifest.requirements[1]:"),
        ] {
            let e = err(&format!(
                r#"{{"entrypoint":"main.py","requirements":{bad}}}"#
            ));
            assert!(e.starts_with(field), "{bad}: {e}");
        }
    }

    #[test]
    fn given_requirements_true_then_the_uploads_requirements_txt_is_read_and_checked() {
        let m = parse_with(
            r#"{"entrypoint":"main.py","requirements":true}"#,
            &[
                ("main.py", b"".as_slice()),
                ("requirements.txt", b"# x\nsix==1.17.0\n\nalpha\n"),
            ],
        )
        .unwrap();
        assert_eq!(m.requirements, ["six==1.17.0", "alpha"]);
        let e = parse_with(
            r#"{"entrypoint":"main.py","requirements":true}"#,
            &[("main.py", b"".as_slice()), ("requirements.txt", b"-e .\n")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("manifest.requirements[0]:"), "{e}");
        let e = err(r#"{"entrypoint":"main.py","requirements":true}"#);
        assert!(e.contains("requirements.txt"), "{e}");
        // The original Sandrun's form names the file.
        let m = parse_with(
            r#"{"entrypoint":"main.py","requirements":"requirements.txt"}"#,
            &[
                ("main.py", b"".as_slice()),
                ("requirements.txt", b"six==1.17.0\n"),
            ],
        )
        .unwrap();
        assert_eq!(m.requirements, ["six==1.17.0"]);
        let m = parse_with(
            r#"{"entrypoint":"main.py","requirements":"deps/py.txt"}"#,
            &[("main.py", b"".as_slice()), ("deps/py.txt", b"alpha\n")],
        )
        .unwrap();
        assert_eq!(m.requirements, ["alpha"]);
        // A file name that is not in the upload, or another installer's file: a 400 naming it,
        // never a pip install of a distribution called "requirements.txt".
        let e = parse_with(
            r#"{"entrypoint":"main.py","requirements":"package.json"}"#,
            &[("main.py", b"".as_slice()), ("package.json", b"{}")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("manifest.requirements:") && e.contains("npm"),
            "a package.json in the upload is still npm's: {e}"
        );
        for (manifest, says) in [
            (r#""requirements.txt""#, "which the upload does not have"),
            (r#""package.json""#, "npm"),
            (r#""Gemfile""#, "bundler"),
        ] {
            let e = err(&format!(
                r#"{{"entrypoint":"main.py","requirements":{manifest}}}"#
            ));
            assert!(
                e.starts_with("manifest.requirements:") && e.contains(says),
                "{manifest}: {e}"
            );
        }
        // Shipping the file without asking installs nothing.
        let m = parse_with(
            r#"{"entrypoint":"main.py"}"#,
            &[("main.py", b"".as_slice()), ("requirements.txt", b"six\n")],
        )
        .unwrap();
        assert!(m.requirements.is_empty());
    }

    #[test]
    fn given_requirements_then_they_are_in_the_canonical_manifest_and_without_them_nothing_changes()
    {
        let with = parse(
            r#"{"entrypoint":"main.py","requirements":["six"]}"#,
            &["main.py"],
        )
        .unwrap();
        let without = parse(r#"{"entrypoint":"main.py"}"#, &["main.py"]).unwrap();
        let with = String::from_utf8(with.canonical_json()).unwrap();
        let without = String::from_utf8(without.canonical_json()).unwrap();
        assert!(with.ends_with(r#","requirements":["six"]}"#), "{with}");
        assert!(!without.contains("requirements"), "{without}");
    }

    #[test]
    fn given_an_entrypoint_not_in_the_upload_then_it_is_refused() {
        let e = err(r#"{"entrypoint":"missing.py"}"#);
        assert!(
            e.starts_with("manifest.entrypoint:") && e.contains("missing.py"),
            "{e}"
        );
        let e = err(r#"{"entrypoint":"../main.py"}"#);
        assert!(e.starts_with("manifest.entrypoint:"), "{e}");
    }

    #[test]
    fn given_an_interpreter_not_allowed_or_unknown_extension_then_it_is_refused() {
        assert!(err(r#"{"entrypoint":"main.py","interpreter":"perl"}"#)
            .starts_with("manifest.interpreter:"));
        assert!(err(r#"{"entrypoint":"tool.rb"}"#).starts_with("manifest.interpreter: required"));
    }

    #[test]
    fn given_bad_output_patterns_or_environment_then_the_field_is_named() {
        assert!(err(r#"{"entrypoint":"main.py","outputs":["ok/","../x"]}"#)
            .starts_with("manifest.outputs[1]:"));
        assert!(err(r#"{"entrypoint":"main.py","environment":"../etc"}"#)
            .starts_with("manifest.environment:"));
        // Any valid name passes here (the gateway asks the helper whether it is built), unless
        // the configuration lists the allowed ones.
        assert!(parse(
            r#"{"entrypoint":"main.py","environment":"nope"}"#,
            &["main.py"]
        )
        .is_ok());
        let policy = ManifestPolicy {
            environments: vec!["small".into()],
            ..ManifestPolicy::default()
        };
        let raw = RawManifest::parse(br#"{"entrypoint":"main.py","environment":"nope"}"#).unwrap();
        let e = Manifest::from_raw(raw, &policy, &files(&["main.py"])).unwrap_err();
        assert_eq!(e.field, "manifest.environment");
    }

    #[test]
    fn given_an_environment_then_its_variables_cannot_be_set_and_without_one_they_can() {
        let e = err(r#"{"entrypoint":"main.py","environment":"small","env":{"PYTHONPATH":"x"}}"#);
        assert!(e.starts_with("manifest.env.PYTHONPATH:"), "{e}");
        let e = err(r#"{"entrypoint":"main.py","environment":"small","env":{"NODE_PATH":"x"}}"#);
        assert!(e.starts_with("manifest.env.NODE_PATH:"), "{e}");
        assert!(parse(
            r#"{"entrypoint":"main.py","env":{"PYTHONPATH":"src"}}"#,
            &["main.py"]
        )
        .is_ok());
    }

    #[test]
    fn given_two_equal_manifests_then_canonical_json_is_identical_and_complete() {
        let a = parse(
            r#"{"entrypoint":"main.py","env":{"B":"1","A":"2"}}"#,
            &["main.py"],
        );
        let b = parse(
            r#"{ "env": {"A":"2","B":"1"}, "entrypoint": "./main.py" }"#,
            &["main.py"],
        );
        let (a, b) = (a.unwrap().canonical_json(), b.unwrap().canonical_json());
        assert_eq!(a, b);
        assert_eq!(
            String::from_utf8(a).unwrap(),
            r#"{"entrypoint":"main.py","interpreter":"python3","environment":null,"args":[],"env":{"A":"2","B":"1"},"outputs":[],"timeout":300,"memory_mb":512,"cpu_seconds":10}"#
        );
    }

    #[test]
    fn given_trailing_garbage_or_a_non_object_then_the_manifest_is_refused() {
        assert!(RawManifest::parse(br#"{} x"#).is_err());
        assert!(RawManifest::parse(br#"[]"#).is_err());
        assert!(RawManifest::parse(br#"{"timeout":1,"timeout":2}"#).is_err());
    }
}
