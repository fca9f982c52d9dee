//! Signed results: the worker's Ed25519 key, the job hash and the canonical result message.
//!
//! The formats here are a public contract, documented in `docs/signatures.md`: a client rebuilds
//! the job hash from what it uploaded, and the signed message from the `/status` fields, then
//! verifies the signature with any Ed25519 tool.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, KeypairBytes};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::bundle::Bundle;
use crate::manifest::Manifest;

/// First line of the job hash input.
pub const JOB_HASH_DOMAIN: &str = "sandrun-job-v1";
/// First line of the signed result message of a job without an environment template.
pub const RESULT_DOMAIN: &str = "sandrun-result-v1";
/// First line of the signed result message of a job with an environment template: the v1 lines
/// plus `environment=` and `environment_lock=` after `job_hash=`.
pub const RESULT_DOMAIN_V2: &str = "sandrun-result-v2";
/// First line of the signed result message of a job with requirements: the lines of v1 (or v2
/// with a template), plus `requirements=<count>` and one `requirement=` line per installed
/// distribution before `exit_code=`.
pub const RESULT_DOMAIN_V3: &str = "sandrun-result-v3";
/// Largest key file read, in bytes (a PKCS#8 Ed25519 PEM is about 120).
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// A failure loading or saving the worker key, naming the step and the path.
#[derive(Debug)]
#[non_exhaustive]
pub enum KeyError {
    /// Opening, reading or writing the file failed.
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is readable or writable by group or others (local configuration).
    InsecureMode { path: PathBuf, mode: u32 },
    /// The file is not an Ed25519 PKCS#8 PEM key.
    Format { path: PathBuf, reason: String },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Io { step, path, source } => {
                write!(f, "{step} worker key {}: {source}", path.display())
            }
            KeyError::InsecureMode { path, mode } => write!(
                f,
                "worker key {} has mode {mode:o}: group and others must have no access (chmod 600)",
                path.display()
            ),
            KeyError::Format { path, reason } => {
                write!(
                    f,
                    "worker key {} is not an Ed25519 PKCS#8 PEM key: {reason}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The worker's Ed25519 signing key.
pub struct WorkerKey {
    key: SigningKey,
}

impl std::fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("WorkerKey")
            .field("worker_id", &self.worker_id())
            .finish()
    }
}

impl WorkerKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Self {
        WorkerKey {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Loads a PKCS#8 PEM key. Refuses a file that group or others can access.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let io = |step| {
            move |source| KeyError::Io {
                step,
                path: path.to_owned(),
                source,
            }
        };
        let file = std::fs::File::open(path).map_err(io("open"))?;
        let mode = file.metadata().map_err(io("stat"))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecureMode {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let mut pem = String::new();
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_string(&mut pem)
            .map_err(io("read"))?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(WorkerKey { key })
    }

    /// Writes the key as PKCS#8 v1 PEM (`openssl pkey` reads it) to a new file with mode 0600.
    /// Never overwrites a file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), KeyError> {
        let path = path.as_ref();
        let io = |step| {
            move |source| KeyError::Io {
                step,
                path: path.to_owned(),
                source,
            }
        };
        // PKCS#8 v1 (secret only): OpenSSL 3.0 cannot read the v2 form that embeds the public key.
        let keypair = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        let pem = keypair
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Format {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io("create"))?;
        file.write_all(pem.as_bytes()).map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))
    }

    /// The public key in standard base64 (44 characters, padded), as the original Sandrun
    /// reported it: the worker's identity in `/status`, `/health` and `GET /`.
    pub fn worker_id(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.key.verifying_key().as_bytes())
    }

    /// The public key in lowercase hex (64 characters), reported beside [`WorkerKey::worker_id`].
    pub fn worker_id_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The public key as an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl` reads it.
    pub fn public_key_pem(&self) -> String {
        // Invariant: encoding a valid 32-byte Ed25519 public key as SPKI DER/PEM cannot fail.
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("an Ed25519 public key always encodes")
    }

    /// Signs `msg` (pure Ed25519, no prehash); returns the 64-byte signature in standard base64.
    pub fn sign(&self, msg: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.key.sign(msg).to_bytes())
    }
}

/// What a signature vouches for. Every field appears in `/status`.
#[derive(Debug, Clone, Copy)]
pub struct ResultClaim<'a> {
    pub job_id: &'a str,
    pub job_hash: &'a [u8; 32],
    /// `None` when the job was killed by a signal or never ran to an exit.
    pub exit_code: Option<i32>,
    pub cpu_ms: u64,
    pub memory_peak_bytes: u64,
    /// Output files as (relative path, sha256 of the content), in any order.
    pub outputs: &'a [(String, [u8; 32])],
    /// Unix time in seconds.
    pub completed_at: u64,
    /// The job's environment template and the SHA-256 of its `sandrun-lock.json`, as the helper
    /// read it from the job's own template mount; `None` for a job without one.
    pub environment: Option<EnvironmentClaim<'a>>,
    /// What the job's requirements installed from the wheelhouse (sha256 of each wheel as the
    /// helper read it there) and whether the install succeeded; `None` for a job without
    /// requirements.
    pub requirements: Option<RequirementsClaim<'a>>,
}

/// The requirements part of a [`ResultClaim`].
#[derive(Debug, Clone, Copy)]
pub struct RequirementsClaim<'a> {
    pub installed: &'a [crate::requirements::InstalledPackage],
    /// The install failed or its outcome could not be attested (the report has an `error`; the
    /// list is then empty). Signed as `requirements_result=failed`, so that a failed install
    /// (exit code 1 from the install step) never has the bytes of a job whose template had
    /// every requirement and whose command exited 1.
    pub failed: bool,
}

impl<'a> RequirementsClaim<'a> {
    pub fn from_report(report: &'a crate::requirements::RequirementsReport) -> Self {
        RequirementsClaim {
            installed: &report.installed,
            failed: report.error.is_some(),
        }
    }
}

/// The template part of a [`ResultClaim`].
#[derive(Debug, Clone, Copy)]
pub struct EnvironmentClaim<'a> {
    pub name: &'a str,
    pub lock_sha256: &'a [u8; 32],
}

impl ResultClaim<'_> {
    /// The first line of the message: [`RESULT_DOMAIN`] without a template (the bytes of such a
    /// result are those of format 1, so every verifier of format 1 keeps working), else
    /// [`RESULT_DOMAIN_V2`].
    pub fn format(&self) -> &'static str {
        if self.requirements.is_some() {
            RESULT_DOMAIN_V3
        } else if self.environment.is_some() {
            RESULT_DOMAIN_V2
        } else {
            RESULT_DOMAIN
        }
    }
}

/// The exact bytes signed for a result (see `docs/signatures.md`):
///
/// ```text
/// sandrun-result-v1                  (v2 for a job with a template, v3 with requirements)
/// job_id=<job id>
/// job_hash=<64 hex>
/// environment=<template name>        (a job with a template: v2, or v3)
/// environment_lock=<64 hex sha256 of the template's sandrun-lock.json>   (likewise)
/// requirements=<count>               (v3 only)
/// requirement=<64 hex sha256 of the wheel> <name>==<version>   (v3, one per line, sorted)
/// requirements_result=<installed|failed>   (v3 only)
/// exit_code=<decimal, or "none">
/// cpu_ms=<decimal>
/// memory_peak_bytes=<decimal>
/// completed_at=<decimal unix seconds>
/// outputs=<count>
/// output=<64 hex sha256> <path>      (one line per output, sorted by path bytes)
/// ```
///
/// Every line ends with `\n`. In `job_id` and paths, `\` is written `\\` and a newline `\n`;
/// validated paths contain neither, so for them the text is the path itself.
pub fn canonical_message(c: &ResultClaim) -> Vec<u8> {
    let exit_code = c
        .exit_code
        .map_or_else(|| "none".to_owned(), |code| code.to_string());
    let environment = c.environment.map_or_else(String::new, |e| {
        format!(
            "environment={}\nenvironment_lock={}\n",
            escape_line(e.name),
            hex::encode(e.lock_sha256)
        )
    });
    let requirements = c.requirements.map_or_else(String::new, |r| {
        let mut lines: Vec<String> = r
            .installed
            .iter()
            .map(|p| {
                format!(
                    "requirement={} {}=={}\n",
                    hex::encode(p.sha256),
                    escape_line(&p.name),
                    escape_line(&p.version)
                )
            })
            .collect();
        lines.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let result = if r.failed { "failed" } else { "installed" };
        format!(
            "requirements={}\n{}requirements_result={result}\n",
            r.installed.len(),
            lines.concat()
        )
    });
    let mut out = format!(
        "{}\njob_id={}\njob_hash={}\n{environment}{requirements}exit_code={exit_code}\ncpu_ms={}\n\
         memory_peak_bytes={}\ncompleted_at={}\noutputs={}\n",
        c.format(),
        escape_line(c.job_id),
        hex::encode(c.job_hash),
        c.cpu_ms,
        c.memory_peak_bytes,
        c.completed_at,
        c.outputs.len(),
    );
    let mut outputs: Vec<&(String, [u8; 32])> = c.outputs.iter().collect();
    outputs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    for (path, digest) in outputs {
        out.push_str(&format!(
            "output={} {}\n",
            hex::encode(digest),
            escape_line(path)
        ));
    }
    out.into_bytes()
}

/// The job hash (see `docs/signatures.md`): sha256 of
///
/// ```text
/// sandrun-job-v1
/// manifest <byte length of the canonical JSON>
/// <canonical manifest JSON>
/// files <count>
/// file <64 hex sha256 of content> <path>      (one line per file, sorted by path bytes)
/// stdin <64 hex sha256 of the stdin bytes>     (only when the job has stdin)
/// ```
///
/// Every line ends with `\n`.
pub fn job_hash(manifest: &Manifest, bundle: &Bundle, stdin: &[u8]) -> [u8; 32] {
    let json = manifest.canonical_json();
    let mut h = Sha256::new();
    h.update(format!("{JOB_HASH_DOMAIN}\nmanifest {}\n", json.len()));
    h.update(&json);
    h.update(format!("\nfiles {}\n", bundle.files().len()));
    // `Bundle::files` is sorted by path, and `BundlePath` orders by its bytes.
    for file in bundle.files() {
        let digest = Sha256::digest(&file.data);
        h.update(format!(
            "file {} {}\n",
            hex::encode(digest),
            escape_line(file.path.as_str())
        ));
    }
    // Only a job with stdin has this line, so the hash of every other job is unchanged.
    if !stdin.is_empty() {
        h.update(format!("stdin {}\n", hex::encode(Sha256::digest(stdin))));
    }
    h.finalize().into()
}

/// Makes a value safe to end a line with: `\` → `\\`, newline → `\n`.
fn escape_line(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    use super::*;

    fn claim<'a>(outputs: &'a [(String, [u8; 32])], hash: &'a [u8; 32]) -> ResultClaim<'a> {
        ResultClaim {
            job_id: "0123abcd",
            job_hash: hash,
            exit_code: Some(0),
            cpu_ms: 1234,
            memory_peak_bytes: 5_000_000,
            outputs,
            completed_at: 1_700_000_000,
            environment: None,
            requirements: None,
        }
    }

    #[test]
    fn given_a_template_then_the_message_is_v2_with_its_name_and_lock_and_v1_is_unchanged_without()
    {
        let lock = [0xcd; 32];
        let mut c = claim(&[], &[1; 32]);
        let v1 = String::from_utf8(canonical_message(&c)).unwrap();
        assert!(
            v1.starts_with("sandrun-result-v1\njob_id=0123abcd\njob_hash="),
            "{v1}"
        );
        assert!(!v1.contains("environment"), "{v1}");
        c.environment = Some(EnvironmentClaim {
            name: "small",
            lock_sha256: &lock,
        });
        let v2 = String::from_utf8(canonical_message(&c)).unwrap();
        let expected = format!(
            "sandrun-result-v2\njob_id=0123abcd\njob_hash={}\nenvironment=small\n\
             environment_lock={}\nexit_code=0\ncpu_ms=1234\nmemory_peak_bytes=5000000\n\
             completed_at=1700000000\noutputs=0\n",
            "01".repeat(32),
            "cd".repeat(32)
        );
        assert_eq!(v2, expected);
        assert_eq!(c.format(), RESULT_DOMAIN_V2);
    }

    #[test]
    fn given_requirements_then_the_message_is_v3_with_their_sorted_lines_after_the_template() {
        let lock = [0xcd; 32];
        let installed = vec![
            crate::requirements::InstalledPackage {
                name: "zeta".into(),
                version: "2.0".into(),
                wheel: "zeta-2.0-py3-none-any.whl".into(),
                sha256: [0xaa; 32],
            },
            crate::requirements::InstalledPackage {
                name: "alpha".into(),
                version: "1.0".into(),
                wheel: "alpha-1.0-py3-none-any.whl".into(),
                sha256: [0xbb; 32],
            },
        ];
        let mut c = claim(&[], &[1; 32]);
        c.requirements = Some(RequirementsClaim {
            installed: &installed,
            failed: false,
        });
        let v3 = String::from_utf8(canonical_message(&c)).unwrap();
        let expected = format!(
            "sandrun-result-v3\njob_id=0123abcd\njob_hash={}\nrequirements=2\n\
             requirement={} zeta==2.0\nrequirement={} alpha==1.0\nrequirements_result=installed\n\
             exit_code=0\ncpu_ms=1234\n\
             memory_peak_bytes=5000000\ncompleted_at=1700000000\noutputs=0\n",
            "01".repeat(32),
            "aa".repeat(32),
            "bb".repeat(32)
        );
        assert_eq!(v3, expected);
        assert_eq!(c.format(), RESULT_DOMAIN_V3);
        c.environment = Some(EnvironmentClaim {
            name: "small",
            lock_sha256: &lock,
        });
        let with_env = String::from_utf8(canonical_message(&c)).unwrap();
        assert!(
            with_env.contains(&format!(
                "environment_lock={}\nrequirements=2\n",
                "cd".repeat(32)
            )),
            "{with_env}"
        );
        // Nothing installed (all from the template) is still format 3, with a count of 0.
        c.requirements = Some(RequirementsClaim {
            installed: &[],
            failed: false,
        });
        let none = String::from_utf8(canonical_message(&c)).unwrap();
        assert!(
            none.contains("\nrequirements=0\nrequirements_result=installed\nexit_code=0\n"),
            "{none}"
        );
        // A failed install (the install step exits 1) is not the same message as a template
        // that had everything and a command that exited 1.
        c.exit_code = Some(1);
        let ran = canonical_message(&c);
        c.requirements = Some(RequirementsClaim {
            installed: &[],
            failed: true,
        });
        let failed = String::from_utf8(canonical_message(&c)).unwrap();
        assert!(
            failed.contains("\nrequirements=0\nrequirements_result=failed\nexit_code=1\n"),
            "{failed}"
        );
        assert_ne!(ran, failed.into_bytes());
    }

    #[test]
    fn given_a_claim_then_the_message_is_the_documented_text_with_sorted_outputs() {
        let outputs = vec![
            ("z.txt".to_owned(), [0xbb; 32]),
            ("a/b.png".to_owned(), [0xaa; 32]),
        ];
        let msg = String::from_utf8(canonical_message(&claim(&outputs, &[1; 32]))).unwrap();
        let expected = format!(
            "sandrun-result-v1\njob_id=0123abcd\njob_hash={}\nexit_code=0\ncpu_ms=1234\n\
             memory_peak_bytes=5000000\ncompleted_at=1700000000\noutputs=2\n\
             output={} a/b.png\noutput={} z.txt\n",
            "01".repeat(32),
            "aa".repeat(32),
            "bb".repeat(32)
        );
        assert_eq!(msg, expected);
    }

    #[test]
    fn given_no_exit_code_then_the_message_says_none() {
        let mut c = claim(&[], &[0; 32]);
        c.exit_code = None;
        let msg = String::from_utf8(canonical_message(&c)).unwrap();
        assert!(msg.contains("\nexit_code=none\n"));
        assert!(msg.ends_with("outputs=0\n"));
    }

    #[test]
    fn given_a_path_with_a_newline_then_it_cannot_forge_an_extra_line() {
        let evil = vec![("a\noutput=00 b".to_owned(), [0; 32])];
        let msg = String::from_utf8(canonical_message(&claim(&evil, &[0; 32]))).unwrap();
        assert_eq!(msg.lines().filter(|l| l.starts_with("output=")).count(), 1);
    }

    #[test]
    fn given_a_signature_then_the_public_key_pem_verifies_it_and_not_a_changed_message() {
        let key = WorkerKey::generate();
        let msg = canonical_message(&claim(&[], &[7; 32]));
        let sig = base64::engine::general_purpose::STANDARD
            .decode(key.sign(&msg))
            .unwrap();
        let sig = Signature::from_slice(&sig).unwrap();
        let public = VerifyingKey::from_public_key_pem(&key.public_key_pem()).unwrap();
        assert!(public.verify(&msg, &sig).is_ok());
        let mut changed = msg.clone();
        changed[20] ^= 1;
        assert!(public.verify(&changed, &sig).is_err());
        assert_eq!(key.worker_id_hex(), hex::encode(public.as_bytes()));
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
        assert_eq!(key.worker_id(), b64);
    }

    #[test]
    fn given_a_saved_key_then_it_has_mode_0600_and_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.pem");
        let key = WorkerKey::generate();
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(WorkerKey::load(&path).unwrap().worker_id(), key.worker_id());
        assert!(matches!(
            key.save(&path),
            Err(KeyError::Io { step: "create", .. })
        ));
    }

    #[test]
    fn given_a_key_readable_by_others_then_loading_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.pem");
        WorkerKey::generate().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            WorkerKey::load(&path),
            Err(KeyError::InsecureMode { .. })
        ));
    }

    #[test]
    fn given_garbage_in_the_key_file_then_loading_fails_with_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.pem");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            WorkerKey::load(&path),
            Err(KeyError::Format { .. })
        ));
    }
}
