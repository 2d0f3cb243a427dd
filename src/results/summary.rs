//! Summaries across the runs of a sweep: one row per run, and mean and spread over seeds.

use super::{MetricsRow, RunInfo};
use serde::Serialize;

/// One run's outcome.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub run: String,
    pub status: String,
    pub epochs: usize,
    pub final_test_bits_per_dim: f64,
    /// The epoch with the lowest validation bits/dim: model selection on the held-out training
    /// images, never on test. Empty without a validation split.
    pub best_epoch: Option<usize>,
    pub best_validation_bits_per_dim: Option<f64>,
    /// The test bits/dim of the epoch chosen on validation.
    pub test_bits_per_dim_at_best: Option<f64>,
    pub parameters: usize,
    pub wall_seconds: f64,
    pub train_images_per_second: f64,
}

impl RunSummary {
    /// `None` for a run without a finished epoch.
    pub fn new(run: &str, info: &RunInfo, metrics: &[MetricsRow]) -> Option<RunSummary> {
        let last = metrics.last()?;
        let best = metrics
            .iter()
            .filter_map(|m| Some((m.validation_bits_per_dim?, m)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        Some(RunSummary {
            run: run.into(),
            status: info.status_word(),
            epochs: last.epoch,
            final_test_bits_per_dim: last.test_bits_per_dim,
            best_epoch: best.map(|(_, m)| m.epoch),
            best_validation_bits_per_dim: best.map(|(v, _)| v),
            test_bits_per_dim_at_best: best.map(|(_, m)| m.test_bits_per_dim),
            parameters: info.parameters,
            wall_seconds: metrics
                .iter()
                .map(|m| m.train_seconds + m.test_seconds)
                .sum(),
            train_images_per_second: metrics
                .iter()
                .map(|m| m.train_images_per_second)
                .sum::<f64>()
                / metrics.len() as f64,
        })
    }
}

/// The runs that differ only in `seed=...`, with the mean and the sample standard deviation of their
/// final test bits per dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedGroup {
    pub config: String,
    pub seeds: usize,
    pub mean: f64,
    pub std: f64,
}

/// Groups runs by their name without its `seed=` part.
pub fn seed_groups(runs: &[RunSummary]) -> Vec<SeedGroup> {
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for r in runs {
        let config: Vec<&str> = r
            .run
            .split('_')
            .filter(|p| !p.starts_with("seed=") && !p.starts_with("train.seed="))
            .collect();
        let config = if config.is_empty() {
            "all".into()
        } else {
            config.join("_")
        };
        match groups.iter_mut().find(|(c, _)| *c == config) {
            Some((_, v)) => v.push(r.final_test_bits_per_dim),
            None => groups.push((config, vec![r.final_test_bits_per_dim])),
        }
    }
    groups
        .into_iter()
        .map(|(config, v)| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = if v.len() > 1 {
                v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            SeedGroup {
                config,
                seeds: v.len(),
                mean,
                std: var.sqrt(),
            }
        })
        .collect()
}

/// The summary as CSV.
pub fn to_csv(runs: &[RunSummary]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in runs {
        w.serialize(r).expect("a summary row serialises");
    }
    String::from_utf8(w.into_inner().expect("in memory")).expect("CSV is UTF-8")
}

/// The summary as a Markdown table, plus a table over seeds when some configuration has several.
pub fn to_markdown(runs: &[RunSummary], missing: &[String]) -> String {
    let mut out = String::from(
        "| run | status | epochs | final test bits/dim | best epoch (on validation) | validation bits/dim there | test bits/dim there | parameters | wall time | train images/s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let or_dash = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    for r in runs {
        out.push_str(&format!(
            "| {} | {} | {} | {:.4} | {} | {} | {} | {} | {} | {:.1} |\n",
            r.run,
            r.status,
            r.epochs,
            r.final_test_bits_per_dim,
            r.best_epoch.map_or("-".into(), |e| e.to_string()),
            or_dash(r.best_validation_bits_per_dim),
            or_dash(r.test_bits_per_dim_at_best),
            r.parameters,
            duration(r.wall_seconds),
            r.train_images_per_second
        ));
    }
    for m in missing {
        out.push_str(&format!("| {m} | not run | | | | | | | | |\n"));
    }
    let groups = seed_groups(runs);
    if groups.iter().any(|g| g.seeds > 1) {
        out.push_str(
            "\n| configuration | seeds | final test bits/dim (mean ± sd) |\n|---|---:|---:|\n",
        );
        for g in groups {
            // One seed has no spread: none is printed.
            let spread = match g.seeds {
                1 => " (one seed: no spread)".to_string(),
                _ => format!(" ± {:.4}", g.std),
            };
            out.push_str(&format!(
                "| {} | {} | {:.4}{spread} |\n",
                g.config, g.seeds, g.mean
            ));
        }
    }
    out
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Status;

    fn info() -> RunInfo {
        RunInfo {
            name: "x".into(),
            crate_version: "0".into(),
            git_revision: "r".into(),
            backend: "flex".into(),
            device: "flex:cpu".into(),
            float_dtype: "f32".into(),
            seed: 1,
            parameters: 1234,
            started: "t".into(),
            ended: None,
            status: Status::Completed,
            epochs_completed: 3,
            error: None,
            overrides: vec![],
            resumed: vec![],
            hardware: String::new(),
            validation_images: 0,
            backend_choice: String::new(),
            world_size: 1,
            cuda_graph: None,
            ranks: vec![],
        }
    }

    /// Epochs with these test bits/dim and, with `validation`, validation bits/dim 0.05 above
    /// test except at epoch 3, where validation is lowest although test is not.
    fn rows(test: &[f64], validation: bool) -> Vec<MetricsRow> {
        test.iter()
            .enumerate()
            .map(|(i, &t)| MetricsRow {
                epoch: i + 1,
                train_bits_per_dim: t + 0.1,
                test_bits_per_dim: t,
                validation_bits_per_dim: validation.then_some(if i == 2 { 0.5 } else { t + 0.05 }),
                train_seconds: 30.0,
                test_seconds: 5.0,
                train_images_per_second: 100.0 + i as f64,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn best_final_and_seed_spread() {
        // Without a validation split nothing is selected (never on test, whose best is epoch 2).
        let a =
            RunSummary::new("layers=5_seed=1", &info(), &rows(&[2.0, 1.5, 1.6], false)).unwrap();
        assert_eq!((a.best_epoch, a.final_test_bits_per_dim), (None, 1.6));
        // With one, the epoch of the lowest validation value, whatever test says.
        let v = RunSummary::new("v", &info(), &rows(&[2.0, 1.5, 1.6, 1.55], true)).unwrap();
        assert_eq!(
            (
                v.best_epoch,
                v.best_validation_bits_per_dim,
                v.test_bits_per_dim_at_best
            ),
            (Some(3), Some(0.5), Some(1.6))
        );
        assert!(
            to_markdown(&[v], &[]).contains("| v | completed | 4 | 1.5500 | 3 | 0.5000 | 1.6000 |")
        );
        assert_eq!(a.wall_seconds, 105.0);
        assert_eq!(a.train_images_per_second, 101.0);
        let b = RunSummary::new("layers=5_seed=2", &info(), &rows(&[1.8], false)).unwrap();
        let c = RunSummary::new("layers=9_seed=1", &info(), &rows(&[1.2], false)).unwrap();
        let g = seed_groups(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].config.as_str(), g[0].seeds), ("layers=5", 2));
        assert!((g[0].mean - 1.7).abs() < 1e-12);
        assert!((g[0].std - (0.02f64).sqrt()).abs() < 1e-12);
        let md = to_markdown(&[a, b, c], &["layers=9_seed=2".into()]);
        assert!(
            md.contains(
                "| layers=5_seed=1 | completed | 3 | 1.6000 | - | - | - | 1234 | 1m45s | 101.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("| layers=9_seed=2 | not run |"), "{md}");
        assert!(md.contains("| layers=5 | 2 | 1.7000 ± 0.1414 |"), "{md}");
        assert!(
            md.contains("| layers=9 | 1 | 1.2000 (one seed: no spread) |"),
            "{md}"
        );
        assert!(!md.contains("± 0.0000"), "{md}");
        assert!(RunSummary::new("empty", &info(), &[]).is_none());
    }
}
