//! The helper's logger: one line per record on stderr, for the `log` macros.
//!
//! In place of `tracing-subscriber` (whose level filter brings a regex engine into root): the
//! level comes from `RUST_LOG` (`off`, `error`, `warn`, `info`, `debug`, `trace`; default
//! `info`). Under journald (stderr is the stream named by `JOURNAL_STREAM`) each line starts with
//! its syslog priority, `<3>` to `<7>`, and carries no timestamp (the journal has its own);
//! otherwise (a terminal, a file) lines read `2026-01-31T12:00:00.123Z WARN message`. No colours.

#![forbid(unsafe_code)]

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    journal: bool,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Names and labels in a message come from clients: a newline or escape in one must not
        // forge a line or drive the terminal.
        let text = escape_controls(&record.args().to_string());
        let line = if self.journal {
            format!("<{}>{text}\n", priority(record.level()))
        } else {
            format!(
                "{} {:5} {text}\n",
                timestamp(SystemTime::now()),
                record.level()
            )
        };
        // One write per line, so lines from a forked child cannot interleave within a line; a
        // log line that cannot be written is dropped (there is nowhere else to say so).
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Parses a `RUST_LOG` value. A bare level applies; `target=level` directives are accepted for
/// compatibility with the gateway's filter syntax and the most verbose level among them applies
/// (the helper has one target). Anything else is an error, not a silent default.
pub fn parse_level(spec: &str) -> Result<LevelFilter, String> {
    let mut most = None;
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        let level: LevelFilter = level.parse().map_err(|_| {
            format!("RUST_LOG={spec:?}: expected off, error, warn, info, debug or trace")
        })?;
        most = Some(most.map_or(level, |m: LevelFilter| m.max(level)));
    }
    most.ok_or_else(|| format!("RUST_LOG={spec:?}: empty"))
}

/// Installs the logger with the level from `RUST_LOG`. Call once, before the environment is
/// cleared (it reads `RUST_LOG` and `JOURNAL_STREAM`).
pub fn init() -> Result<(), String> {
    let level = match std::env::var("RUST_LOG") {
        Ok(spec) => parse_level(&spec)?,
        Err(std::env::VarError::NotPresent) => LevelFilter::Info,
        Err(std::env::VarError::NotUnicode(_)) => return Err("RUST_LOG is not UTF-8".into()),
    };
    let journal = std::env::var("JOURNAL_STREAM").is_ok_and(|s| stderr_is(&s));
    log::set_boxed_logger(Box::new(Logger { journal }))
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    log::set_max_level(level);
    Ok(())
}

/// Whether stderr is the stream `JOURNAL_STREAM` (`DEVICE:INODE`) names, as systemd.exec(5)
/// says to check: a variable inherited by a process whose stderr was redirected does not count.
fn stderr_is(journal_stream: &str) -> bool {
    let Some((dev, ino)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(libc::STDERR_FILENO).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// `text` with every control character written as a `\u{..}` escape.
fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Syslog priority of a level (sd-daemon(3)): err, warning, info, debug.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// RFC 3339 UTC with milliseconds, from the days-to-civil conversion (proleptic Gregorian).
fn timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, shifted so eras start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn given_levels_and_directives_then_the_most_verbose_applies() {
        assert_eq!(parse_level("info"), Ok(LevelFilter::Info));
        assert_eq!(parse_level("WARN"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("off"), Ok(LevelFilter::Off));
        assert_eq!(parse_level("warn,sandrund=debug"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("sandrun_gateway=trace"), Ok(LevelFilter::Trace));
    }

    #[test]
    fn given_a_bad_spec_then_it_is_refused_not_defaulted() {
        assert!(parse_level("verbose").is_err());
        assert!(parse_level("").is_err());
        assert!(parse_level("x=loud").is_err());
    }

    #[test]
    fn given_known_instants_then_timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_000 + 45_296_789);
        assert_eq!(timestamp(t), "2000-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(timestamp(t), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn given_journal_stream_of_another_file_then_stderr_is_not_the_journal() {
        assert!(!stderr_is("garbage"));
        assert!(!stderr_is("0:0"));
    }

    #[test]
    fn given_journal_stream_of_stderr_then_stderr_is_the_journal() {
        let st = nix::sys::stat::fstat(libc::STDERR_FILENO).expect("fstat stderr");
        assert!(stderr_is(&format!("{}:{}", st.st_dev, st.st_ino)));
    }

    #[test]
    fn given_control_characters_then_they_are_escaped() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(escape_controls("a\nb\x1b[2J"), "a\\u{a}b\\u{1b}[2J");
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Trace), 7);
    }
}
