//! What every scenario's report offers to `--compare` and `--plot`: its headline
//! figures, its latency distribution and whether the run was clean; and the
//! side-by-side table of several runs with ratios against the first.

use std::fmt;

use serde::Serialize;

use super::stats::{Percentile, micros, thousands};

/// A scenario's report, as `ringsocket bench` prints, compares and plots it.
pub trait Summary: Serialize + fmt::Display {
    /// The mode's name: `echo`, `broadcast`, `connect`.
    const MODE: &'static str;
    /// What the latency distribution measures, e.g. "round trip".
    const LATENCY: &'static str;

    /// The server's URL.
    fn url(&self) -> &str;

    /// The figures that the side-by-side table compares, in order.
    fn figures(&self) -> Vec<Figure>;

    /// The latency distribution, for `--plot`.
    fn latency_curve(&self) -> &[Percentile];

    /// Why the run is not clean (lost, mismatched or unanswered messages, failed
    /// connections), or `None`.
    fn failure(&self) -> Option<String>;
}

/// One figure of a report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figure {
    /// What it is, e.g. "messages/s".
    pub name: &'static str,
    /// Its value, `None` when not measured.
    pub value: Option<f64>,
    /// Whether a larger value is better (throughput) or worse (latency, memory, loss).
    pub higher_is_better: bool,
}

impl Figure {
    /// A figure where more is better.
    pub fn more(name: &'static str, value: impl Into<Option<f64>>) -> Self {
        Self {
            name,
            value: value.into(),
            higher_is_better: true,
        }
    }

    /// A figure where less is better.
    pub fn less(name: &'static str, value: impl Into<Option<f64>>) -> Self {
        Self {
            name,
            value: value.into(),
            higher_is_better: false,
        }
    }
}

/// Several runs of one scenario against different servers, side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison<R> {
    /// The mode.
    pub mode: &'static str,
    /// One entry per server, in the order of the command line.
    pub runs: Vec<Run<R>>,
    /// The figures of every run, with ratios against the first.
    pub figures: Vec<ComparedFigure>,
}

/// One server's run: its report, or why the bench could not run against it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run<R> {
    /// The server's URL.
    pub url: String,
    /// The report, when the bench ran.
    pub report: Option<R>,
    /// Why it did not run, or why the run is not clean.
    pub error: Option<String>,
}

/// One figure across the runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparedFigure {
    /// What it is.
    pub name: &'static str,
    /// Whether a larger value is better.
    pub higher_is_better: bool,
    /// Its value in each run (`None`: not measured or the run failed).
    pub values: Vec<Option<f64>>,
    /// `value / first run's value` for each run.
    pub ratios: Vec<Option<f64>>,
}

impl<R: Summary> Comparison<R> {
    /// Lines up the figures of `runs`.
    pub fn new(runs: Vec<Run<R>>) -> Self {
        let mut figures: Vec<ComparedFigure> = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            let Some(report) = &run.report else { continue };
            for figure in report.figures() {
                let row = match figures.iter_mut().position(|f| f.name == figure.name) {
                    Some(row) => row,
                    None => {
                        figures.push(ComparedFigure {
                            name: figure.name,
                            higher_is_better: figure.higher_is_better,
                            values: vec![None; runs.len()],
                            ratios: vec![None; runs.len()],
                        });
                        figures.len() - 1
                    }
                };
                figures[row].values[i] = figure.value;
            }
        }
        for figure in &mut figures {
            let base = figure.values.first().copied().flatten();
            for (ratio, value) in figure.ratios.iter_mut().zip(&figure.values) {
                *ratio = match (base, value) {
                    (Some(base), Some(value)) if base != 0.0 => Some(value / base),
                    _ => None,
                };
            }
        }
        Self {
            mode: R::MODE,
            runs,
            figures,
        }
    }

    /// The runs that failed or were not clean, as one message.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<String> = self
            .runs
            .iter()
            .filter_map(|run| run.error.as_ref().map(|e| format!("{}: {e}", run.url)))
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

impl<R: Summary> fmt::Display for Comparison<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec![format!("bench {}", self.mode)];
        header.extend(
            self.runs
                .iter()
                .enumerate()
                .map(|(i, run)| format!("[{}] {}", i + 1, run.url)),
        );
        rows.push(header);
        for figure in &self.figures {
            let mut row = vec![format!(
                "{} ({} better)",
                figure.name,
                if figure.higher_is_better {
                    "higher"
                } else {
                    "lower"
                }
            )];
            for (i, (value, ratio)) in figure.values.iter().zip(&figure.ratios).enumerate() {
                row.push(match (value, ratio) {
                    (None, _) => "n/a".to_owned(),
                    (Some(v), _) if i == 0 => number(*v),
                    (Some(v), Some(r)) => format!("{} ({r:.2}×)", number(*v)),
                    (Some(v), None) => number(*v),
                });
            }
            rows.push(row);
        }
        let columns = rows.first().map_or(0, Vec::len);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                rows.iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, row) in rows.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    write!(f, "{cell}{:pad$}", "")?;
                } else {
                    write!(f, "  {:pad$}{cell}", "")?;
                }
            }
            if i + 1 < rows.len() {
                writeln!(f)?;
            }
        }
        writeln!(f)?;
        write!(f, "(×): the server's figure divided by that of [1]")?;
        for run in &self.runs {
            if let Some(error) = &run.error {
                write!(f, "\n{}: {error}", run.url)?;
            }
        }
        Ok(())
    }
}

/// A figure as the table shows it: thousands separators for large numbers, one
/// decimal below 100.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        if v < 0.0 {
            format!("-{}", thousands((-v).round() as u64))
        } else {
            thousands(v.round() as u64)
        }
    } else {
        micros(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize)]
    struct Fake {
        url: String,
        rate: f64,
        p99: Option<f64>,
    }

    impl fmt::Display for Fake {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fake {}", self.url)
        }
    }

    impl Summary for Fake {
        const MODE: &'static str = "fake";
        const LATENCY: &'static str = "nothing";
        fn url(&self) -> &str {
            &self.url
        }
        fn figures(&self) -> Vec<Figure> {
            vec![
                Figure::more("messages/s", self.rate),
                Figure::less("p99 µs", self.p99),
            ]
        }
        fn latency_curve(&self) -> &[Percentile] {
            &[]
        }
        fn failure(&self) -> Option<String> {
            None
        }
    }

    #[test]
    fn ratios_are_against_the_first_run() {
        let run = |url: &str, rate, p99| Run {
            url: url.into(),
            report: Some(Fake {
                url: url.into(),
                rate,
                p99,
            }),
            error: None,
        };
        let c = Comparison::new(vec![
            run("ws://a/", 1000.0, Some(50.0)),
            run("ws://b/", 2500.0, None),
            Run {
                url: "ws://c/".into(),
                report: None,
                error: Some("refused".into()),
            },
        ]);
        assert_eq!(c.figures.len(), 2);
        assert_eq!(c.figures[0].ratios, vec![Some(1.0), Some(2.5), None]);
        assert_eq!(c.figures[1].values, vec![Some(50.0), None, None]);
        let table = c.to_string();
        assert!(table.contains("2,500 (2.50×)"), "{table}");
        assert!(table.contains("ws://c/: refused"), "{table}");
        assert_eq!(c.failure().as_deref(), Some("ws://c/: refused"));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["figures"][0]["ratios"][1], 2.5);
        assert_eq!(json["runs"][2]["error"], "refused");
    }
}
