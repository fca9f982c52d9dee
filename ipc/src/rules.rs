//! The one place for the rules both sides apply to the names in a job: environment variable
//! names, and the number and size of arguments, variables and output patterns. Paths and output
//! patterns are their own validated types ([`crate::BundlePath`], [`crate::OutputPattern`]).
//!
//! The gateway checks a manifest against these rules so that a job the helper would refuse is
//! refused at `/submit` with a 400; the helper checks every request against the same rules again,
//! because it trusts nobody. Keeping one list here is what makes the two agree.

/// Variables the sandbox sets itself (or that describe the sandbox's terminal and user); a job
/// may not set them.
pub const RESERVED_ENV: [&str; 10] = [
    "PATH", "HOME", "TMPDIR", "USER", "LOGNAME", "LANG", "PWD", "SHELL", "HOSTNAME", "TERM",
];

/// Prefixes of variable names a job may not set (the dynamic loader's `LD_PRELOAD` and kin).
pub const RESERVED_ENV_PREFIXES: [&str; 1] = ["LD_"];

/// Longest environment variable name, in bytes.
pub const MAX_ENV_NAME_BYTES: usize = 128;

/// Most arguments (`argv`, including `argv[0]`) a job may have.
pub const MAX_ARGS: usize = 1024;

/// Most extra environment variables a job may have.
pub const MAX_ENV: usize = 128;

/// Most output patterns a job may have.
pub const MAX_OUTPUT_PATTERNS: usize = 64;

/// Most bytes of the job's own arguments and variables together, counted as the kernel does
/// (`arg\0` and `NAME=value\0`). The helper adds its few fixed variables and the interpreter's
/// path on top, which it controls.
pub const MAX_ARGV_ENV_BYTES: usize = 128 * 1024;

/// Why an environment variable name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvNameError {
    /// Not `[A-Za-z_][A-Za-z0-9_]*` of at most [`MAX_ENV_NAME_BYTES`] bytes.
    Malformed,
    /// One of [`RESERVED_ENV`].
    Reserved,
    /// Starts with one of [`RESERVED_ENV_PREFIXES`].
    ReservedPrefix(&'static str),
}

impl std::fmt::Display for EnvNameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvNameError::Malformed => write!(
                f,
                "names must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_NAME_BYTES} bytes"
            ),
            EnvNameError::Reserved => write!(f, "set by the sandbox, it cannot be overridden"),
            EnvNameError::ReservedPrefix(p) => write!(f, "{p}* variables are not allowed"),
        }
    }
}

impl std::error::Error for EnvNameError {}

/// Checks one environment variable name a job asks for.
///
/// ```
/// use sandrun_ipc::rules::{check_env_name, EnvNameError};
/// assert_eq!(check_env_name("GREETING"), Ok(()));
/// assert_eq!(check_env_name("TERM"), Err(EnvNameError::Reserved));
/// assert_eq!(check_env_name("LD_PRELOAD"), Err(EnvNameError::ReservedPrefix("LD_")));
/// assert_eq!(check_env_name("A=B"), Err(EnvNameError::Malformed));
/// ```
pub fn check_env_name(name: &str) -> Result<(), EnvNameError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || name.len() > MAX_ENV_NAME_BYTES {
        return Err(EnvNameError::Malformed);
    }
    if let Some(p) = RESERVED_ENV_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(EnvNameError::ReservedPrefix(p));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(EnvNameError::Reserved);
    }
    Ok(())
}

/// The bytes `argv` and `env` take as the kernel counts them (each with its NUL, a variable as
/// `NAME=value`), to compare with [`MAX_ARGV_ENV_BYTES`].
pub fn argv_env_bytes(argv: &[String], env: &[(String, String)]) -> usize {
    let args: usize = argv.iter().map(|a| a.len() + 1).sum();
    let vars: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    args.saturating_add(vars)
}

/// The socket the helper listens on by default (`sandrund --socket`, the gateway's
/// `helper_socket`, `sandrunctl --socket`).
pub const DEFAULT_SOCKET: &str = "/run/sandrun/sandrund.sock";

/// The helper's `template_dir` by default (where `sandrunctl env build` puts templates).
pub const DEFAULT_TEMPLATE_DIR: &str = "/var/lib/sandrun/templates";

/// The helper's `wheelhouse_dir` by default (which `sandrunctl env wheelhouse add` fills).
pub const DEFAULT_WHEELHOUSE_DIR: &str = "/var/lib/sandrun/wheelhouse";

/// Where a job's template is mounted, read-only, inside its sandbox.
pub const TEMPLATE_MOUNT: &str = "/env";

/// The lock file at the top of every template (written by `sandrunctl env build`). Its SHA-256
/// is the template's lock hash, which goes into the job's signed result.
pub const LOCK_FILE: &str = "sandrun-lock.json";

/// Largest lock file the helper reads (a template without a usable lock runs no job).
pub const MAX_LOCK_BYTES: usize = 256 * 1024;

/// Most templates one [`crate::Request::ListTemplates`] answer lists.
pub const MAX_TEMPLATES: usize = 256;

/// Most lock bytes one [`crate::Request::ListTemplates`] answer carries, all templates together.
pub const MAX_TEMPLATE_LIST_BYTES: usize = 4 << 20;

/// `PATH` of a job without a template.
pub const JOB_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The variables a job with a template gets so that `python3 main.py` imports the template's
/// packages (installed flat at its top by `pip install --target`) and runs its console scripts
/// (`bin/`), with no change to the job's code. A job with a template may not set them itself
/// ([`check_job_env_name`]); a job without one may set `PYTHONPATH` and `NODE_PATH`.
pub const TEMPLATE_ENV: [(&str, &str); 3] = [
    ("PATH", "/env/bin:/usr/local/bin:/usr/bin:/bin"),
    ("PYTHONPATH", "/env"),
    ("NODE_PATH", "/env/node_modules"),
];

/// Why a job's variable is refused: the name itself, or that its template sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEnvError {
    Name(EnvNameError),
    /// One of [`TEMPLATE_ENV`], and the job uses a template.
    SetByTemplate,
}

impl std::fmt::Display for JobEnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobEnvError::Name(e) => e.fmt(f),
            JobEnvError::SetByTemplate => write!(
                f,
                "set by the environment template (it points at {TEMPLATE_MOUNT}), it cannot be \
                 overridden"
            ),
        }
    }
}

impl std::error::Error for JobEnvError {}

/// Checks one variable of a job: [`check_env_name`], and with a template, none of
/// [`TEMPLATE_ENV`]. The gateway refuses such a manifest with a 400; the helper refuses the
/// request.
///
/// ```
/// use sandrun_ipc::rules::{check_job_env_name, JobEnvError};
/// assert_eq!(check_job_env_name("PYTHONPATH", false), Ok(()));
/// assert_eq!(check_job_env_name("PYTHONPATH", true), Err(JobEnvError::SetByTemplate));
/// ```
pub fn check_job_env_name(name: &str, template: bool) -> Result<(), JobEnvError> {
    check_env_name(name).map_err(JobEnvError::Name)?;
    if template && TEMPLATE_ENV.iter().any(|(k, _)| *k == name) {
        return Err(JobEnvError::SetByTemplate);
    }
    Ok(())
}

/// Whether `name` is a valid environment template name: `[A-Za-z0-9._-]`, 1 to 64 bytes, no
/// leading dot (so it is one path component below the template directory, never hidden or
/// `..`). The helper checks job requests with it, `sandrunctl env` the names it builds.
pub fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Most lines a job's `requirements` may have. The helper passes them to the install step as
/// one argument, which the kernel caps at 128 KiB (`MAX_ARG_STRLEN`): 64 lines of at most
/// [`MAX_REQUIREMENT_BYTES`] stay well below it.
pub const MAX_REQUIREMENTS: usize = 64;

/// Longest requirement line, in bytes.
pub const MAX_REQUIREMENT_BYTES: usize = 1024;

/// Where the sandbox mounts the operator's wheelhouse (read-only) for a job with requirements.
pub const WHEELHOUSE_MOUNT: &str = "/wheelhouse";

/// Why a requirement line is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequirementError {
    Empty,
    TooLong,
    /// More than [`MAX_REQUIREMENTS`] lines (reported at the first line past the limit).
    TooMany,
    /// The distribution name is not `[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?`.
    Name,
    /// Something other than extras, a version specifier and `--hash=sha256:<64 hex>` options:
    /// URLs, paths, `-e`, `-r`, `--index-url`, `-f`, environment markers and the like.
    Syntax(String),
}

impl std::fmt::Display for RequirementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequirementError::Empty => write!(f, "empty requirement"),
            RequirementError::TooLong => {
                write!(f, "longer than {MAX_REQUIREMENT_BYTES} bytes")
            }
            RequirementError::TooMany => {
                write!(f, "more than {MAX_REQUIREMENTS} requirements")
            }
            RequirementError::Name => write!(
                f,
                "must start with a distribution name ([A-Za-z0-9._-], no URL or path)"
            ),
            RequirementError::Syntax(what) => write!(
                f,
                "{what}: only `name[extras] <version specifier> --hash=sha256:<hex>` is \
                 allowed (no options, URLs, paths, includes or markers)"
            ),
        }
    }
}

impl std::error::Error for RequirementError {}

/// Checks one requirement line of a job (pip requirements-file syntax, restricted) and returns
/// its distribution name. Allowed: `name`, `name[extra,...]`, a version specifier made of
/// `<>=!~` operators, versions, `,` and `*`, and any number of `--hash=sha256:<64 hex>`.
/// Everything else pip would accept (options such as `-e`, `-r`, `-f`, `--index-url`, URLs,
/// local paths, markers after `;`, comments) is refused, so a job's requirements can only name
/// distributions of the wheelhouse.
///
/// ```
/// use sandrun_ipc::rules::check_requirement;
/// assert_eq!(check_requirement("six==1.17.0").unwrap(), "six");
/// assert!(check_requirement("six @ https://example.com/six.whl").is_err());
/// assert!(check_requirement("-r other.txt").is_err());
/// ```
pub fn check_requirement(line: &str) -> Result<String, RequirementError> {
    if line.len() > MAX_REQUIREMENT_BYTES {
        return Err(RequirementError::TooLong);
    }
    let line = line.trim_matches(' ');
    if line.is_empty() {
        return Err(RequirementError::Empty);
    }
    let mut words = line.split(' ').filter(|w| !w.is_empty()).peekable();
    let mut spec = String::new();
    let mut first_word = 0;
    while let Some(w) = words.peek() {
        // Every option, not only `--hash=`, ends the specifier (and is then refused below
        // unless it is a hash): `six --no-deps` must not read as a name `six--no-deps`.
        if w.starts_with('-') {
            break;
        }
        if spec.is_empty() {
            first_word = w.len();
        }
        spec.push_str(w);
        words.next();
    }
    for w in words {
        let ok = w.strip_prefix("--hash=sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !ok {
            return Err(RequirementError::Syntax(format!("`{}`", truncate(w))));
        }
    }
    let name_end = spec
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .unwrap_or(spec.len());
    // The name is the first word's own (`six x` is not `sixx`).
    let name_end = name_end.min(first_word);
    let name = &spec[..name_end];
    let name_ok = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !name_ok {
        return Err(RequirementError::Name);
    }
    let mut rest = &spec[name_end..];
    if let Some(after) = rest.strip_prefix('[') {
        let Some(close) = after.find(']') else {
            return Err(RequirementError::Syntax("unclosed extras".to_owned()));
        };
        let extras = &after[..close];
        let extras_ok = extras.split(',').all(|e| {
            !e.is_empty()
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        });
        if !extras_ok {
            return Err(RequirementError::Syntax("extras".to_owned()));
        }
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        let ops_ok = rest.starts_with(['<', '>', '=', '!', '~'])
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "<>=!~.,*+".contains(c));
        if !ops_ok {
            return Err(RequirementError::Syntax(format!("`{}`", truncate(rest))));
        }
    }
    Ok(name.to_owned())
}

/// Checks a job's whole `requirements` (one requirement per entry); the error names the entry.
pub fn check_requirements(lines: &[String]) -> Result<(), (usize, RequirementError)> {
    if lines.len() > MAX_REQUIREMENTS {
        return Err((MAX_REQUIREMENTS, RequirementError::TooMany));
    }
    for (i, line) in lines.iter().enumerate() {
        check_requirement(line).map_err(|e| (i, e))?;
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_every_reserved_name_then_it_is_refused_and_ordinary_names_pass() {
        for name in RESERVED_ENV {
            assert_eq!(check_env_name(name), Err(EnvNameError::Reserved), "{name}");
        }
        for name in ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_"] {
            assert_eq!(
                check_env_name(name),
                Err(EnvNameError::ReservedPrefix("LD_"))
            );
        }
        for name in [
            "",
            "1X",
            "A-B",
            "A=B",
            "É",
            &"A".repeat(MAX_ENV_NAME_BYTES + 1),
        ] {
            assert_eq!(check_env_name(name), Err(EnvNameError::Malformed), "{name}");
        }
        for name in [
            "GREETING",
            "_X",
            "term",
            "A_1",
            &"A".repeat(MAX_ENV_NAME_BYTES),
        ] {
            assert_eq!(check_env_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn given_a_template_then_its_variables_are_reserved_and_without_one_they_are_not() {
        for (name, _) in TEMPLATE_ENV {
            assert_ne!(check_job_env_name(name, true), Ok(()), "{name}");
        }
        assert_eq!(check_job_env_name("NODE_PATH", false), Ok(()));
        assert_eq!(
            check_job_env_name("PATH", false),
            Err(JobEnvError::Name(EnvNameError::Reserved))
        );
        assert_eq!(check_job_env_name("GREETING", true), Ok(()));
        assert!(TEMPLATE_ENV.iter().all(|(_, v)| v.contains(TEMPLATE_MOUNT)));
    }

    #[test]
    fn given_requirement_lines_then_only_names_specifiers_and_hashes_pass() {
        let hash = format!("--hash=sha256:{}", "a".repeat(64));
        for (line, name) in [
            ("six", "six"),
            ("six==1.17.0", "six"),
            ("  Six_x.y-z >= 1.0, <2 ", "Six_x.y-z"),
            ("pkg[extra,two]~=1.2", "pkg"),
            (&format!("six==1.17.0 {hash} {hash}"), "six"),
        ] {
            assert_eq!(check_requirement(line).as_deref(), Ok(name), "{line}");
        }
        for line in [
            "",
            "-e .",
            "-r other.txt",
            "-f /tmp",
            "--index-url https://evil",
            "--extra-index-url=https://evil",
            "six @ https://example.com/six.whl",
            "./six-1.0-py3-none-any.whl",
            "/wheelhouse/six.whl",
            "https://example.com/six.whl",
            "six; python_version > '3'",
            "six # comment",
            "six --hash=md5:abc",
            &format!("six --hash=sha256:{}", "A".repeat(64)),
            "six --no-deps",
            "six -e",
            "six x",
            "six\nnumpy",
            "six\t==1",
            "pkg[ex",
            &"a".repeat(MAX_REQUIREMENT_BYTES + 1),
        ] {
            assert!(check_requirement(line).is_err(), "accepted {line:?}");
        }
        let many = vec!["six".to_owned(); MAX_REQUIREMENTS + 1];
        let (at, e) = check_requirements(&many).expect_err("too many accepted");
        assert_eq!((at, &e), (MAX_REQUIREMENTS, &RequirementError::TooMany));
        assert_eq!(
            e.to_string(),
            format!("more than {MAX_REQUIREMENTS} requirements")
        );
        assert!(check_requirements(&many[..MAX_REQUIREMENTS]).is_ok());
        let two = vec!["six".to_owned(), "-e .".to_owned()];
        assert_eq!(check_requirements(&two).map_err(|e| e.0), Err(1));
    }

    #[test]
    fn given_argv_and_env_then_bytes_are_counted_with_their_nuls() {
        let argv = vec!["python3".to_owned(), "main.py".to_owned()];
        let env = vec![("A".to_owned(), "xy".to_owned())];
        assert_eq!(argv_env_bytes(&argv, &env), 8 + 8 + 5);
    }
}
