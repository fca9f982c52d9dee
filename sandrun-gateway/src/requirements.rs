//! What a job's requirements came to, parsed from the install step's record.
//!
//! The helper relays the record unread ([`sandrun_ipc::RequirementsRecord`]): it was written by
//! the install step (`sandrund/src/server/install_requirements.py`), a process running as the
//! job's uid, and every parser of such bytes lives in the gateway. The install step writes the
//! record before any code of the job runs and closes its pipe before it `execve`s the job's
//! command, so the job cannot add to it (see the helper's `server/requirements.rs`).
//!
//! The record is `installed\n`, then one `NAME VERSION WHEEL SHA256\n` per distribution pip
//! installed (the wheel's file name in the wheelhouse and the lowercase hex SHA-256 of that
//! file, which the install step read from the read-only `/wheelhouse` mount), then `end\n`; or
//! `failed MESSAGE\nend\n` when the install failed and the command did not run. Anything else
//! (nothing written: the job was killed during its install; cut short; malformed) is
//! "the requirements install did not finish".

use sandrun_ipc::{ExitReason, RequirementsRecord, MAX_REQUIREMENTS_RECORD_BYTES};

/// One distribution a job's requirements installed from the wheelhouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
    /// File name of the wheel in the wheelhouse.
    pub wheel: String,
    /// SHA-256 of that wheel, read from the operator's wheelhouse before the job's code ran.
    pub sha256: [u8; 32],
}

/// What a job's requirements came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequirementsReport {
    /// What was installed, sorted by name. Requirements the template already satisfied are not
    /// installed and not listed.
    pub installed: Vec<InstalledPackage>,
    /// Why the install failed (the command did not run; reason [`ExitReason::Requirements`]),
    /// or why what was installed cannot be attested although the install step said it
    /// succeeded and ran the command (a record the gateway refuses; reason
    /// [`ExitReason::Internal`], `installed` empty); `None` when it succeeded.
    pub error: Option<String>,
}

/// A parsed record: the report, and whether the install step finished and handed over to the
/// command.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub report: RequirementsReport,
    pub command_ran: bool,
}

impl Outcome {
    /// The job's reason given the helper's: an install that failed is the job's
    /// [`ExitReason::Requirements`] (its command did not run), a record the gateway cannot
    /// attest after the command ran is [`ExitReason::Internal`]. A reason the helper found
    /// (a timeout, a memory limit, a cancel) stands.
    pub fn reason(&self, helper: ExitReason) -> ExitReason {
        match helper {
            ExitReason::None | ExitReason::OutputLimit if self.report.error.is_some() => {
                if self.command_ran {
                    ExitReason::Internal
                } else {
                    ExitReason::Requirements
                }
            }
            other => other,
        }
    }
}

/// Largest failure message kept.
const MAX_MESSAGE_CHARS: usize = 300;
/// Most distributions one job's report may name (each a distinct wheel).
const MAX_INSTALLED: usize = 256;
/// What a missing, cut-short or malformed record means.
pub const NOT_FINISHED: &str = "the requirements install did not finish";

/// Parses the install step's record (see the module docs).
pub fn parse(record: &RequirementsRecord) -> Outcome {
    let not_run = |msg: String| Outcome {
        report: failed(msg),
        command_ran: false,
    };
    if record.overflowed || record.bytes.len() > MAX_REQUIREMENTS_RECORD_BYTES {
        return not_run(format!(
            "the install step's record is longer than {MAX_REQUIREMENTS_RECORD_BYTES} bytes"
        ));
    }
    // Exactly `...\nend\n`: `installedend\n`, or a last line without its newline, is not a
    // record the install step writes.
    let Some(body) = std::str::from_utf8(&record.bytes)
        .ok()
        .and_then(|t| t.strip_suffix("end\n"))
        .filter(|b| b.ends_with('\n'))
    else {
        return not_run(NOT_FINISHED.to_owned());
    };
    let mut lines = body.split_terminator('\n');
    let first = lines.next().unwrap_or("");
    if let Some(msg) = first.strip_prefix("failed ") {
        if lines.next().is_some() {
            return not_run(NOT_FINISHED.to_owned());
        }
        return not_run(printable(msg));
    }
    if first != "installed" {
        return not_run(NOT_FINISHED.to_owned());
    }
    Outcome {
        report: installed_list(lines).unwrap_or_else(failed),
        command_ran: true,
    }
}

fn failed(msg: String) -> RequirementsReport {
    RequirementsReport {
        installed: Vec::new(),
        error: Some(msg),
    }
}

/// The `NAME VERSION WHEEL SHA256` lines of a complete `installed` record, sorted by name.
fn installed_list<'a>(lines: impl Iterator<Item = &'a str>) -> Result<RequirementsReport, String> {
    let mut installed: Vec<InstalledPackage> = Vec::new();
    for line in lines {
        if installed.len() == MAX_INSTALLED {
            return Err(format!("more than {MAX_INSTALLED} distributions installed"));
        }
        let p = installed_package(line)?;
        // pip installs a distribution once: one wheel named twice is not an install.
        if installed.iter().any(|q| q.wheel == p.wheel) {
            return Err(format!("the install step named {} twice", p.wheel));
        }
        installed.push(p);
    }
    installed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(RequirementsReport {
        installed,
        error: None,
    })
}

/// One `NAME VERSION WHEEL SHA256` line.
fn installed_package(line: &str) -> Result<InstalledPackage, String> {
    let bad = || "the install step's record has a malformed line".to_owned();
    let mut words = line.split(' ');
    let (Some(name), Some(version), Some(wheel), Some(hash), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(bad());
    };
    let word_ok = |w: &str, extra: &str| {
        !w.is_empty()
            && w.len() <= 200
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
    };
    if !word_ok(name, "") || !word_ok(version, "+!") || !word_ok(wheel, "+!") {
        return Err(bad());
    }
    if !wheel.ends_with(".whl") || wheel.starts_with('.') {
        return Err(bad());
    }
    // Lowercase hex only, so one hash has one spelling in the signed message.
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(hash, &mut sha256).map_err(|_| bad())?;
    Ok(InstalledPackage {
        name: name.to_owned(),
        version: version.to_owned(),
        wheel: wheel.to_owned(),
        sha256,
    })
}

/// Printable ASCII only, bounded.
fn printable(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if s.is_empty() {
        "the requirements install failed".to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> RequirementsRecord {
        RequirementsRecord {
            bytes: text.as_bytes().to_vec(),
            overflowed: false,
        }
    }

    const A: &str = "a 1 a-1-py3-none-any.whl";
    const HASH_A: &str = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";

    #[test]
    fn given_an_installed_record_then_the_list_is_sorted_with_each_wheels_hash() {
        let hash_b = "3e744b9dc39389baf0c5a0660589b8402f3dbb49b89b3e75f2c9355852a3c677";
        let got = parse(&record(&format!(
            "installed\nb 2.0+x b-2.0-py3-none-any.whl {hash_b}\n{A} {HASH_A}\nend\n"
        )));
        assert!(got.command_ran);
        assert_eq!(got.report.error, None);
        let names: Vec<&str> = got
            .report
            .installed
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(hex::encode(got.report.installed[0].sha256), HASH_A);
        assert_eq!(got.report.installed[1].version, "2.0+x");
        assert_eq!(got.reason(ExitReason::None), ExitReason::None);
        let none = parse(&record("installed\nend\n"));
        assert_eq!((none.report.error, none.report.installed.len()), (None, 0));
    }

    #[test]
    fn given_a_failure_record_or_none_or_a_bad_one_then_the_report_says_so() {
        let upper = HASH_A.to_uppercase();
        let twice = format!("installed\n{A} {HASH_A}\n{A} {HASH_A}\nend\n");
        let traversal = format!("installed\nx 1 ../../etc/passwd.whl {HASH_A}\nend\n");
        let no_hash = format!("installed\n{A}\nend\n");
        let short_hash = format!("installed\n{A} {}\nend\n", &HASH_A[1..]);
        let upper_hash = format!("installed\n{A} {upper}\nend\n");
        let cut = format!("installed\n{A} {HASH_A}\n");
        let malformed = "the install step's record has a malformed line";
        // (record, error, whether the command ran: only after a complete `installed` record)
        for (text, want, ran) in [
            ("", NOT_FINISHED, false),
            // Cut short (the install step was killed while writing it).
            (cut.as_str(), NOT_FINISHED, false),
            ("something\nend\n", NOT_FINISHED, false),
            ("failed x\ninstalled\nend\n", NOT_FINISHED, false),
            ("installed\r\nend\n", NOT_FINISHED, false),
            ("installedend\n", NOT_FINISHED, false),
            ("end\n", NOT_FINISHED, false),
            (
                twice.as_str(),
                "the install step named a-1-py3-none-any.whl twice",
                true,
            ),
            (traversal.as_str(), malformed, true),
            (no_hash.as_str(), malformed, true),
            (short_hash.as_str(), malformed, true),
            (upper_hash.as_str(), malformed, true),
            (
                "failed the wheelhouse has no distribution for zz\x1b\nend\n",
                "the wheelhouse has no distribution for zz",
                false,
            ),
        ] {
            let got = parse(&record(text));
            assert_eq!(got.report.error.as_deref(), Some(want), "{text:?}");
            assert_eq!(got.command_ran, ran, "{text:?}");
            assert!(got.report.installed.is_empty());
            let reason = if ran {
                ExitReason::Internal
            } else {
                ExitReason::Requirements
            };
            assert_eq!(got.reason(ExitReason::None), reason, "{text:?}");
            // What the helper found first stands.
            assert_eq!(got.reason(ExitReason::Timeout), ExitReason::Timeout);
        }
        let bad_utf8 = RequirementsRecord {
            bytes: b"failed \xff\nend\n".to_vec(),
            overflowed: false,
        };
        assert_eq!(parse(&bad_utf8).report.error.as_deref(), Some(NOT_FINISHED));
    }

    #[test]
    fn given_an_overflowed_or_oversized_record_then_it_is_refused_unread() {
        let mut r = record("installed\nend\n");
        r.overflowed = true;
        let got = parse(&r);
        assert!(!got.command_ran);
        assert!(got.report.error.is_some_and(|e| e.contains("longer than")));
        let big = record(&"x".repeat(MAX_REQUIREMENTS_RECORD_BYTES + 1));
        assert!(parse(&big)
            .report
            .error
            .is_some_and(|e| e.contains("longer than")));
    }

    #[test]
    fn given_too_many_distributions_then_the_list_is_refused() {
        let mut text = String::from("installed\n");
        for i in 0..=MAX_INSTALLED {
            text.push_str(&format!("p{i} 1 p{i}-1-py3-none-any.whl {HASH_A}\n"));
        }
        text.push_str("end\n");
        let got = parse(&record(&text));
        assert!(got.command_ran);
        assert_eq!(
            got.report.error,
            Some(format!("more than {MAX_INSTALLED} distributions installed"))
        );
    }
}
