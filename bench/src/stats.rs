//! Summaries of samples (median, p90, p99, count) and the table every figure ends up in.

use std::time::Duration;

/// Median, 90th and 99th percentiles and count of a set of samples, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub count: usize,
}

impl Summary {
    /// Nearest-rank percentiles. An empty set gives zeros and count 0.
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary {
                median: 0.0,
                p90: 0.0,
                p99: 0.0,
                count: 0,
            };
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            median: percentile(&v, 50),
            p90: percentile(&v, 90),
            p99: percentile(&v, 99),
            count: v.len(),
        }
    }

    /// One value (a rate or a total over a whole run): every percentile is that value.
    pub fn single(x: f64, count: usize) -> Summary {
        Summary {
            median: x,
            p90: x,
            p99: x,
            count,
        }
    }

    /// Durations in milliseconds.
    pub fn of_ms(samples: &[Duration]) -> Summary {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Summary::of(&ms)
    }
}

/// The nearest-rank `q`th percentile of sorted, non-empty `v`.
fn percentile(v: &[f64], q: usize) -> f64 {
    let rank = (v.len() * q).div_ceil(100).max(1);
    v[rank - 1]
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Figure number and name, e.g. "1 spawn".
    pub figure: String,
    /// What was measured, e.g. "sandrun /bin/true".
    pub what: String,
    pub unit: &'static str,
    pub value: Summary,
    /// The reference measured in the same run, and its name.
    pub reference: Option<(String, Summary)>,
    /// The issue's target for this line, as text, if any.
    pub target: String,
}

impl Row {
    /// A line for something that could not be measured in this run (a tool that is not
    /// installed, or refuses to run here), with the reason: reported, never silently dropped.
    pub fn skipped(figure: &str, what: &str, unit: &'static str, reason: &str) -> Row {
        Row {
            figure: figure.into(),
            what: what.into(),
            unit,
            value: Summary::of(&[]),
            reference: None,
            target: format!("skipped: {reason}"),
        }
    }

    /// `value.median / reference.median`, if there is a reference.
    pub fn ratio(&self) -> Option<f64> {
        let (_, r) = self.reference.as_ref()?;
        (r.median != 0.0 && self.value.count > 0).then(|| self.value.median / r.median)
    }
}

/// Renders rows as a Markdown table (also readable on a terminal).
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | measured | median | p90 | p99 | runs | reference (median, p90) | ratio | target |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let reference = match &r.reference {
            Some((name, s)) => format!("{name}: {} / {}", num(s.median), num(s.p90)),
            None => "-".to_owned(),
        };
        let ratio = r.ratio().map_or("-".to_owned(), |x| format!("{x:.2}"));
        // Nothing measured (a skipped line): no number to show.
        let shown = |x: f64| {
            if r.value.count == 0 {
                "-".to_owned()
            } else {
                num(x)
            }
        };
        out.push_str(&format!(
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} |\n",
            r.figure,
            r.what,
            r.unit,
            shown(r.value.median),
            shown(r.value.p90),
            shown(r.value.p99),
            r.value.count,
            reference,
            ratio,
            r.target
        ));
    }
    out
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_hundred_samples_then_median_and_p99_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.median, s.p90, s.p99, s.count), (50.0, 90.0, 99.0, 100));
    }

    #[test]
    fn given_one_sample_then_every_percentile_is_that_sample() {
        let s = Summary::of(&[7.0]);
        assert_eq!((s.median, s.p90, s.p99, s.count), (7.0, 7.0, 7.0, 1));
    }

    #[test]
    fn given_a_skipped_line_then_it_is_rendered_with_its_reason_and_no_numbers() {
        let row = Row::skipped("8 whole process", "isolate --run", "ms", "not in Debian");
        assert_eq!(row.ratio(), None);
        let table = render(&[row]);
        assert!(
            table.contains(
                "| isolate --run (ms) | - | - | - | 0 | - | - | skipped: not in Debian |"
            ),
            "{table}"
        );
    }

    #[test]
    fn given_reference_then_ratio_divides_the_medians() {
        let row = Row {
            figure: "1".into(),
            what: "x".into(),
            unit: "ms",
            value: Summary::of(&[2.0]),
            reference: Some(("r".into(), Summary::of(&[8.0]))),
            target: String::new(),
        };
        assert_eq!(row.ratio(), Some(0.25));
    }
}
