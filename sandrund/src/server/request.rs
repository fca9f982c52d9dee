//! Validation of a job request, again, in the helper: the gateway's checks are not trusted.
//! Produces a [`ValidJob`] with every limit clamped to the configured maxima.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::ffi::CString;

use sandrun_ipc::{BundleEntry, GrantedLimits, JobSpec, OutputPattern};

use crate::config::Config;

use super::collect::MAX_OUTPUT_FILES;
use super::job::{BUILD_COLLECT_BUDGET, COLLECT_BUDGET};
use sandrun_ipc::rules::{self, MAX_ARGS, MAX_ARGV_ENV_BYTES, MAX_ENV, MAX_OUTPUT_PATTERNS};

/// A request that passed validation.
#[derive(Debug)]
pub struct ValidJob {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub workdir: String,
    pub limits: GrantedLimits,
    pub bundle: Vec<BundleEntry>,
    /// Sum of the bundle's file sizes and of the stdin bytes: exactly this many bytes must
    /// follow, the files' first.
    pub bundle_bytes: u64,
    /// The last `stdin_bytes` of those are the job's standard input.
    pub stdin_bytes: u64,
    pub outputs: Vec<OutputPattern>,
    /// A template name checked to exist below the configured template directory.
    pub template: Option<String>,
    pub label: String,
    /// The job installs requirements from the wheelhouse first (its argv runs the install).
    pub requirements: bool,
    /// A template build (`JobSpec::build`); the caller checks that the peer may ask for it.
    pub build: bool,
    /// The most output files the job returns: `MAX_OUTPUT_FILES`, or the configured
    /// `max_build_output_files` for a build.
    pub max_output_files: usize,
    /// The CPU time the output collection may take: `COLLECT_BUDGET`, or the longer
    /// `BUILD_COLLECT_BUDGET` for a build (thousands of files to hash).
    pub collect_budget: std::time::Duration,
}

/// Why a request was refused, and whose fault: the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    Invalid(String),
    NotFound(String),
    /// The template does not exist or has no usable lock file.
    TemplateMissing(String),
}

fn invalid(msg: impl Into<String>) -> RequestError {
    RequestError::Invalid(msg.into())
}

/// Validates and clamps `spec`.
pub fn validate(cfg: &Config, spec: JobSpec) -> Result<ValidJob, RequestError> {
    let limits = spec
        .limits
        .grant(&cfg.defaults, &cfg.maxima)
        .map_err(|e| invalid(e.to_string()))?;
    let mut argv = validate_argv(cfg, &spec.argv)?;
    let requirements = !spec.requirements.is_empty();
    if requirements {
        argv = with_requirements(cfg, &spec.requirements, argv)?;
    }
    let env = build_env(&spec.env, spec.template.is_some())?;
    // The job's own argv and env, as the gateway counted them (the same rule): the interpreter's
    // path and the sandbox's fixed variables are the helper's, and small.
    if rules::argv_env_bytes(&spec.argv, &spec.env) > MAX_ARGV_ENV_BYTES {
        return Err(invalid(format!(
            "argv and env exceed {MAX_ARGV_ENV_BYTES} bytes"
        )));
    }
    if !spec.workdir.is_empty() {
        sandrun_ipc::BundlePath::new(spec.workdir.clone())
            .map_err(|e| invalid(format!("workdir: {e}")))?;
    }
    let file_bytes = validate_bundle(&spec.bundle, &limits)?;
    let bundle_bytes = validate_stdin(cfg, spec.stdin_bytes, file_bytes, &limits)?;
    if spec.outputs.len() > MAX_OUTPUT_PATTERNS {
        return Err(invalid(format!(
            "more than {MAX_OUTPUT_PATTERNS} output patterns"
        )));
    }
    let template = match &spec.template {
        None => None,
        Some(name) => Some(template_name(cfg, name)?),
    };
    let label = printable_label(&spec.label);
    Ok(ValidJob {
        argv,
        env,
        workdir: spec.workdir,
        limits,
        bundle: spec.bundle,
        bundle_bytes,
        stdin_bytes: spec.stdin_bytes,
        outputs: spec.outputs,
        template,
        label,
        requirements,
        build: spec.build,
        max_output_files: if spec.build {
            usize::try_from(cfg.max_build_output_files).unwrap_or(MAX_OUTPUT_FILES)
        } else {
            MAX_OUTPUT_FILES
        },
        collect_budget: if spec.build {
            BUILD_COLLECT_BUDGET
        } else {
            COLLECT_BUDGET
        },
    })
}

/// The job's label as it is logged and listed: at most 64 characters, none of them control.
fn printable_label(label: &str) -> String {
    label.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Checks a job's requirements and runs its command through the install step
/// ([`super::requirements::INSTALL_PY`]).
fn with_requirements(
    cfg: &Config,
    requirements: &[String],
    argv: Vec<CString>,
) -> Result<Vec<CString>, RequestError> {
    rules::check_requirements(requirements).map_err(|(i, e)| match e {
        rules::RequirementError::TooMany => invalid(format!("requirements: {e}")),
        e => invalid(format!("requirements[{i}]: {e}")),
    })?;
    if !cfg.wheelhouse_dir.is_dir() {
        return Err(invalid(format!(
            "requirements: this helper has no wheelhouse ({} is not a directory)",
            cfg.wheelhouse_dir.display()
        )));
    }
    let Some(python) = cfg.interpreters.get("python3") else {
        return Err(invalid(
            "requirements: the helper has no python3 interpreter to install them with",
        ));
    };
    let argv: Vec<String> = argv
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let python = python.to_string_lossy();
    super::requirements::wrap_argv(&python, requirements, argv)
        .iter()
        .map(|a| cstring("argv", a))
        .collect()
}

fn cstring(what: &str, s: &str) -> Result<CString, RequestError> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte")))
}

fn validate_argv(cfg: &Config, argv: &[String]) -> Result<Vec<CString>, RequestError> {
    let Some(first) = argv.first() else {
        return Err(invalid("argv is empty"));
    };
    if argv.len() > MAX_ARGS {
        return Err(invalid(format!("argv has more than {MAX_ARGS} entries")));
    }
    let program = if let Some(path) = cfg.interpreters.get(first) {
        path.to_string_lossy().into_owned()
    } else if first.starts_with('/') && !first.split('/').any(|c| c == "..") {
        first.clone()
    } else {
        return Err(RequestError::NotFound(format!(
            "argv[0] {first:?} is neither an allowed interpreter ({}) nor an absolute path",
            cfg.interpreters
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let mut out = vec![cstring("argv[0]", &program)?];
    for (i, a) in argv.iter().enumerate().skip(1) {
        out.push(cstring(&format!("argv[{i}]"), a)?);
    }
    Ok(out)
}

/// The sandbox's fixed variables, a template's ([`rules::TEMPLATE_ENV`]) when the job has one,
/// plus the request's allowed ones. Nothing from the helper's own environment is passed.
fn build_env(extra: &[(String, String)], template: bool) -> Result<Vec<CString>, RequestError> {
    if extra.len() > MAX_ENV {
        return Err(invalid(format!(
            "more than {MAX_ENV} environment variables"
        )));
    }
    let mut env = vec![
        format!("PATH={}", rules::JOB_PATH),
        "HOME=/work".to_owned(),
        "TMPDIR=/tmp".to_owned(),
        "USER=sandbox".to_owned(),
        "LOGNAME=sandbox".to_owned(),
        "LANG=C.UTF-8".to_owned(),
        "PWD=/work".to_owned(),
    ];
    if template {
        for (k, v) in rules::TEMPLATE_ENV {
            match env
                .iter_mut()
                .find(|e| e.split_once('=').is_some_and(|(n, _)| n == k))
            {
                Some(e) => *e = format!("{k}={v}"),
                None => env.push(format!("{k}={v}")),
            }
        }
    }
    let mut seen = HashSet::new();
    for (k, v) in extra {
        if let Err(e) = rules::check_job_env_name(k, template) {
            return Err(invalid(format!("env key {k:?} may not be set: {e}")));
        }
        if !seen.insert(k.as_str()) {
            return Err(invalid(format!("env key {k} is repeated")));
        }
        env.push(format!("{k}={v}"));
    }
    env.iter().map(|e| cstring("env", e)).collect()
}

/// Checks the bundle's shape and returns the number of content bytes that must follow: entry
/// count within `file_count`, total within `tmpfs_bytes`, no duplicates, every parent directory
/// declared before its children, and modes without special bits.
fn validate_bundle(entries: &[BundleEntry], limits: &GrantedLimits) -> Result<u64, RequestError> {
    if entries.len() > limits.file_count as usize {
        return Err(invalid(format!(
            "bundle has more than {} entries",
            limits.file_count
        )));
    }
    let mut dirs: HashSet<&str> = HashSet::new();
    let mut all: HashSet<&str> = HashSet::new();
    let mut total: u64 = 0;
    for e in entries {
        let (path, mode) = match e {
            BundleEntry::Dir { path, mode } => (path, *mode),
            BundleEntry::File { path, mode, size } => {
                total = total.saturating_add(*size);
                (path, *mode)
            }
        };
        if mode & !sandrun_ipc::ALLOWED_MODE_BITS != 0 {
            return Err(invalid(format!(
                "bundle entry {path}: mode {mode:o} has special bits"
            )));
        }
        if let Some(parent) = path.as_str().rsplit_once('/').map(|(p, _)| p) {
            if !dirs.contains(parent) {
                return Err(invalid(format!(
                    "bundle entry {path}: parent directory not declared first"
                )));
            }
        }
        if !all.insert(path.as_str()) {
            return Err(invalid(format!("bundle entry {path} is repeated")));
        }
        if matches!(e, BundleEntry::Dir { .. }) {
            dirs.insert(path.as_str());
        }
    }
    if total > limits.tmpfs_bytes {
        return Err(invalid(format!(
            "bundle of {total} bytes exceeds the tmpfs size of {} bytes",
            limits.tmpfs_bytes
        )));
    }
    Ok(total)
}

/// Checks the stdin size against `max_stdin_bytes` and, with the files, against `tmpfs_bytes`
/// (the sandbox writes it into the job's tmpfs). Returns the bytes that must follow.
fn validate_stdin(
    cfg: &Config,
    stdin: u64,
    files: u64,
    limits: &GrantedLimits,
) -> Result<u64, RequestError> {
    if stdin > cfg.max_stdin_bytes {
        return Err(invalid(format!(
            "stdin of {stdin} bytes exceeds max_stdin_bytes ({})",
            cfg.max_stdin_bytes
        )));
    }
    match files.checked_add(stdin) {
        Some(total) if total <= limits.tmpfs_bytes => Ok(total),
        _ => Err(invalid(format!(
            "bundle and stdin exceed the tmpfs size of {} bytes",
            limits.tmpfs_bytes
        ))),
    }
}

/// A valid name of a template that exists with a lock file. (The sandbox reads the lock again
/// from the job's own clone of the template; this early check gives the typed refusal.)
fn template_name(cfg: &Config, name: &str) -> Result<String, RequestError> {
    if !sandrun_ipc::rules::is_template_name(name) {
        return Err(invalid(format!("template name {name:?} is not valid")));
    }
    let path = cfg.template_dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(RequestError::TemplateMissing(format!(
                "template {name:?} does not exist"
            )))
        }
    }
    match std::fs::symlink_metadata(path.join(rules::LOCK_FILE)) {
        Ok(m) if m.is_file() => Ok(name.to_owned()),
        _ => Err(RequestError::TemplateMissing(format!(
            "template {name:?} has no {} (it was not built by sandrunctl env build)",
            rules::LOCK_FILE
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserDb;
    use crate::ids::{GroupId, UserId};
    use sandrun_ipc::{BundlePath, Limits, NetworkPolicy};

    struct NoUsers;
    impl UserDb for NoUsers {
        fn user(&self, _: &str) -> Option<(UserId, GroupId)> {
            None
        }
        fn group(&self, _: &str) -> Option<GroupId> {
            None
        }
    }

    fn cfg() -> Config {
        Config::from_text("", &NoUsers).unwrap()
    }

    fn spec(argv: &[&str]) -> JobSpec {
        JobSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            workdir: String::new(),
            bundle: vec![],
            limits: Limits::default(),
            outputs: vec![],
            template: None,
            network: NetworkPolicy::None,
            label: "t".into(),
            stdin_bytes: 0,
            requirements: Vec::new(),
            build: false,
        }
    }

    fn file(p: &str, size: u64) -> BundleEntry {
        BundleEntry::File {
            path: BundlePath::new(p).unwrap(),
            mode: 0o644,
            size,
        }
    }

    fn dir(p: &str) -> BundleEntry {
        BundleEntry::Dir {
            path: BundlePath::new(p).unwrap(),
            mode: 0o755,
        }
    }

    #[test]
    fn given_huge_limits_then_they_are_clamped_to_the_maxima() {
        let mut s = spec(&["python3", "x.py"]);
        s.limits = Limits {
            wall_ms: Some(u64::MAX),
            memory_bytes: Some(100 << 30),
            cpu_ms: Some(u64::MAX),
            pids: Some(u32::MAX),
            output_bytes: Some(u64::MAX),
            tmpfs_bytes: Some(u64::MAX),
            file_count: Some(u32::MAX),
        };
        let c = cfg();
        let j = validate(&c, s).unwrap();
        assert_eq!(j.limits.wall_ms, c.maxima.wall_ms);
        assert_eq!(j.limits.memory_bytes, c.maxima.memory_bytes);
        assert_eq!(j.limits.pids, c.maxima.pids);
        assert_eq!(j.limits.tmpfs_bytes, c.maxima.tmpfs_bytes);
        assert_eq!(j.argv[0].to_str().unwrap(), "/usr/bin/python3");
    }

    #[test]
    fn given_a_build_job_then_it_gets_the_build_output_file_cap_and_others_keep_1000() {
        let public = validate(&cfg(), spec(&["python3", "main.py"])).unwrap();
        assert_eq!((public.build, public.max_output_files), (false, 1000));
        assert_eq!(public.collect_budget, COLLECT_BUDGET);
        let mut s = spec(&["python3", "main.py"]);
        s.build = true;
        let build = validate(&cfg(), s).unwrap();
        assert_eq!((build.build, build.max_output_files), (true, 100_000));
        assert_eq!(build.collect_budget, BUILD_COLLECT_BUDGET);
    }

    #[test]
    fn given_zero_limits_then_the_field_is_named() {
        let mut s = spec(&["/bin/true"]);
        s.limits.memory_bytes = Some(0);
        assert_eq!(
            validate(&cfg(), s).unwrap_err(),
            RequestError::Invalid("limits.memory_bytes must be positive".into())
        );
    }

    #[test]
    fn given_unknown_or_relative_programs_then_they_are_refused() {
        assert!(matches!(
            validate(&cfg(), spec(&["perl"])),
            Err(RequestError::NotFound(_))
        ));
        assert!(validate(&cfg(), spec(&["bin/true"])).is_err());
        assert!(validate(&cfg(), spec(&["/usr/../bin/true"])).is_err());
        assert!(validate(&cfg(), spec(&[])).is_err());
        assert!(validate(&cfg(), spec(&["/bin/true", "a\0b"])).is_err());
    }

    #[test]
    fn given_dangerous_env_then_it_is_refused() {
        for (k, v) in [
            ("LD_PRELOAD", "/x.so"),
            ("PATH", "/evil"),
            ("HOME", "/"),
            ("1X", "y"),
            ("A=B", "c"),
        ] {
            let mut s = spec(&["/bin/true"]);
            s.env = vec![(k.into(), v.into())];
            assert!(validate(&cfg(), s).is_err(), "{k} accepted");
        }
        for k in sandrun_ipc::rules::RESERVED_ENV {
            let mut s = spec(&["/bin/true"]);
            s.env = vec![(k.into(), "x".into())];
            assert!(validate(&cfg(), s).is_err(), "{k} accepted");
        }
        let mut s = spec(&["/bin/true"]);
        s.env = vec![("GREETING".into(), "hi".into())];
        let j = validate(&cfg(), s).unwrap();
        assert!(j.env.iter().any(|e| e.to_bytes() == b"GREETING=hi"));
        assert!(!j.env.iter().any(|e| e.to_bytes().starts_with(b"SANDRUN")));
    }

    #[test]
    fn given_stdin_then_it_counts_after_the_files_and_within_its_caps() {
        let mut s = spec(&["python3"]);
        s.bundle = vec![file("main.py", 5)];
        s.stdin_bytes = 7;
        let job = validate(&cfg(), s.clone()).unwrap();
        assert_eq!((job.bundle_bytes, job.stdin_bytes), (12, 7));
        s.stdin_bytes = cfg().max_stdin_bytes + 1;
        let e = validate(&cfg(), s.clone()).unwrap_err();
        assert!(
            matches!(&e, RequestError::Invalid(m) if m.contains("max_stdin_bytes")),
            "{e:?}"
        );
        s.stdin_bytes = 1 << 20;
        s.limits.tmpfs_bytes = Some(1 << 20);
        let e = validate(&cfg(), s).unwrap_err();
        assert!(
            matches!(&e, RequestError::Invalid(m) if m.contains("tmpfs")),
            "{e:?}"
        );
    }

    #[test]
    fn given_bundles_then_shape_rules_are_enforced() {
        let mut s = spec(&["/bin/true"]);
        s.bundle = vec![dir("src"), file("src/a.py", 10), file("main.py", 5)];
        assert_eq!(validate(&cfg(), s).unwrap().bundle_bytes, 15);

        let mut s = spec(&["/bin/true"]);
        s.bundle = vec![file("src/a.py", 10)];
        assert!(validate(&cfg(), s).is_err(), "undeclared parent accepted");

        let mut s = spec(&["/bin/true"]);
        s.bundle = vec![file("a", 1), file("a", 1)];
        assert!(validate(&cfg(), s).is_err(), "duplicate accepted");

        let mut s = spec(&["/bin/true"]);
        s.bundle = vec![BundleEntry::File {
            path: BundlePath::new("x").unwrap(),
            mode: 0o4755,
            size: 1,
        }];
        assert!(validate(&cfg(), s).is_err(), "setuid accepted");

        let mut s = spec(&["/bin/true"]);
        s.limits.tmpfs_bytes = Some(1 << 20);
        s.bundle = vec![file("big", 2 << 20)];
        assert!(validate(&cfg(), s).is_err(), "oversized bundle accepted");
    }

    fn cfg_with_templates(dir: &std::path::Path) -> Config {
        let text = format!("template_dir = \"{}\"", dir.display());
        Config::from_text(&text, &NoUsers).unwrap()
    }

    #[test]
    fn given_a_template_then_its_variables_are_set_and_the_job_cannot_override_them() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("py")).unwrap();
        std::fs::write(t.path().join("py").join(rules::LOCK_FILE), "{}").unwrap();
        let c = cfg_with_templates(t.path());
        let mut s = spec(&["python3", "main.py"]);
        s.template = Some("py".into());
        let j = validate(&c, s.clone()).unwrap();
        let env: Vec<&str> = j.env.iter().map(|e| e.to_str().unwrap()).collect();
        assert!(env.contains(&"PYTHONPATH=/env"), "{env:?}");
        assert!(env.contains(&"NODE_PATH=/env/node_modules"), "{env:?}");
        assert!(
            env.contains(&"PATH=/env/bin:/usr/local/bin:/usr/bin:/bin"),
            "{env:?}"
        );
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        for k in ["PYTHONPATH", "NODE_PATH"] {
            let mut s = s.clone();
            s.env = vec![(k.into(), "/elsewhere".into())];
            let e = validate(&c, s).unwrap_err();
            assert!(
                matches!(&e, RequestError::Invalid(m) if m.contains(k)),
                "{e:?}"
            );
        }
        // Without a template, the job's own PYTHONPATH is its business.
        let mut s = spec(&["python3", "main.py"]);
        s.env = vec![("PYTHONPATH".into(), "src".into())];
        let j = validate(&c, s).unwrap();
        assert!(j.env.iter().any(|e| e.to_bytes() == b"PYTHONPATH=src"));
    }

    #[test]
    fn given_an_absent_template_or_one_without_a_lock_then_it_is_missing() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("bare")).unwrap();
        let c = cfg_with_templates(t.path());
        for name in ["absent", "bare"] {
            let mut s = spec(&["python3"]);
            s.template = Some(name.into());
            let e = validate(&c, s).unwrap_err();
            assert!(
                matches!(e, RequestError::TemplateMissing(_)),
                "{name}: {e:?}"
            );
        }
    }

    #[test]
    fn given_bad_template_names_then_they_are_refused() {
        for name in ["../etc", ".hidden", "a/b", "", "x y"] {
            let mut s = spec(&["/bin/true"]);
            s.template = Some(name.into());
            assert!(validate(&cfg(), s).is_err(), "{name:?} accepted");
        }
    }
}
