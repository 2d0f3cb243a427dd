//! `pixel figures`: copies the figures of finished runs into the tracked figures folder
//! (`docs/figures/`), keeps their records (`run.json`, `metrics.csv`, `eval.json`) in
//! `docs/figures/runs/<name>/`, and rewrites two generated sections: the results table in the README
//! and the gallery of grids, curves and maps in `docs/results.md`, so both always match the runs they
//! cite, also in a clone where `results/` (never tracked) is empty. A run that is missing is
//! reported, never invented.

use crate::error::{Error, Result};
use crate::results::{self, RunInfo, SAMPLES_DIR};
use std::path::{Component, Path, PathBuf};

pub const START: &str = "<!-- results:start (written by `pixel figures`) -->";
pub const END: &str = "<!-- results:end -->";
pub const GALLERY_START: &str = "<!-- gallery:start (written by `pixel figures`) -->";
pub const GALLERY_END: &str = "<!-- gallery:end -->";

/// Where `pixel figures` reads and writes, each relative to the working folder.
pub struct Places<'a> {
    /// The folder holding the results folders.
    pub results: &'a Path,
    /// The file with the table's markers (the README).
    pub table: &'a Path,
    /// The file with the gallery's markers (`docs/results.md`).
    pub gallery: &'a Path,
    /// The tracked folder the figures are copied into.
    pub figures: &'a Path,
    /// The folder of experiments whose results are shown.
    pub experiments: &'a Path,
}

/// What `pixel figures` found for one experiment.
#[derive(Debug)]
pub struct Figure {
    pub name: String,
    pub row: Option<String>,
    pub images: Vec<String>,
}

/// `pixel figures`: collects every cited run's figures and rewrites the table and the gallery.
pub fn regenerate(at: &Places) -> Result<()> {
    let table_text = std::fs::read_to_string(at.table).map_err(Error::io(at.table))?;
    let gallery_text = std::fs::read_to_string(at.gallery).map_err(Error::io(at.gallery))?;
    let figs = cited(at.experiments)?
        .iter()
        .map(|name| collect(name, at.results, at.figures))
        .collect::<Result<Vec<_>>>()?;
    for f in figs.iter().filter(|f| f.row.is_none()) {
        eprintln!(
            "not run: {} (no finished epoch in {} or {})",
            f.name,
            at.results.join(&f.name).display(),
            at.figures.join(ARCHIVE_DIR).join(&f.name).display()
        );
    }
    let link = relative(at.gallery.parent().unwrap_or(Path::new("")), at.figures);
    let table_text = rewrite(&table_text, &section(&figs), at.table, (START, END))?;
    let gallery_text = rewrite(
        &gallery_text,
        &gallery(&figs, &link),
        at.gallery,
        (GALLERY_START, GALLERY_END),
    )?;
    crate::results::write_atomic(at.table, table_text.as_bytes())?;
    crate::results::write_atomic(at.gallery, gallery_text.as_bytes())?;
    let shown = figs.iter().filter(|f| f.row.is_some()).count();
    println!(
        "rewrote {} and {} ({shown} runs shown)",
        at.table.display(),
        at.gallery.display()
    );
    Ok(())
}

/// `to` as seen from the folder `from`, both relative to the same folder: `docs` and
/// `docs/figures` give `figures`, `docs` and `figures` give `../figures`.
fn relative(from: &Path, to: &Path) -> String {
    let parts = |p: &Path| -> Vec<String> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    };
    let (from, to) = (parts(from), parts(to));
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out: Vec<String> = vec!["..".into(); from.len() - common];
    out.extend(to[common..].iter().cloned());
    out.join("/")
}

/// The experiments whose results the README shows: every `*.toml` directly in `experiments/`.
pub fn cited(experiments: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(experiments)
        .map_err(Error::io(experiments))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| crate::experiment::plan::name_of(&p))
        .collect();
    names.sort();
    Ok(names)
}

/// The newest sample grid of a results folder.
fn latest_grid(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut grids: Vec<PathBuf> = std::fs::read_dir(dir.join(SAMPLES_DIR))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    grids.sort();
    grids.pop()
}

/// `pixel eval`'s test NLL of a run, as a table cell: bits/dim, K for importance sampling, a
/// PixelVAE's active latent dimensions, and the epoch evaluated when it is not the row's `epochs`.
fn eval_cell(dir: &Path, epochs: usize) -> String {
    let Ok(text) = std::fs::read_to_string(dir.join(crate::results::EVAL_FILE)) else {
        return "-".into();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return "-".into();
    };
    let active = match (
        v["active_latent_dimensions"].as_u64(),
        v["latent_dimensions"].as_u64(),
    ) {
        (Some(a), Some(d)) => format!("; {a} of {d} latent dims active"),
        _ => String::new(),
    };
    let stale = match v["epochs"].as_u64() {
        Some(e) if e as usize != epochs => format!(", after epoch {e}"),
        _ => String::new(),
    };
    match (
        v["test_bits_per_dim"].as_f64(),
        v["importance_samples"].as_u64(),
    ) {
        (Some(b), Some(k)) => format!("{b:.4} (K = {k}{active}){stale}"),
        (Some(b), None) => format!("{b:.4}{stale}"),
        _ => "-".into(),
    }
}

/// The folder inside `figures/` that keeps the records of every run the README shows.
pub const ARCHIVE_DIR: &str = "runs";

/// The files of a run kept in `figures/runs/<name>/`: small, and free of this machine's paths
/// (the resolved `experiment.toml` names the data folder, so it stays in `results/`).
const ARCHIVED: [&str; 4] = [
    results::RUN_FILE,
    results::METRICS_FILE,
    crate::results::EVAL_FILE,
    crate::results::RECEPTIVE_JSON,
];

/// A run's records with at least one finished epoch.
struct Record {
    dir: PathBuf,
    info: RunInfo,
    rows: Vec<results::MetricsRow>,
}

impl Record {
    fn read(dir: PathBuf) -> Option<Record> {
        let info = results::read_info(&dir).ok()?;
        let rows = results::read_metrics(&dir).ok()?;
        (!rows.is_empty()).then_some(Record { dir, info, rows })
    }

    fn epochs(&self) -> usize {
        self.rows.last().map_or(0, |r| r.epoch)
    }
}

/// Describes the row of `name`: from `results/<name>/` when it is there (its grids and curve are
/// copied into `figures/` and its records kept in `figures/runs/<name>/`), else from the kept
/// records, so that a clone without the runs rewrites the same table. Kept records with more
/// finished epochs than `results/<name>/` win over it (a run started over on a new machine does
/// not replace a finished one until it gets further); remove `figures/runs/<name>/` to show it
/// anyway.
pub fn collect(name: &str, results_root: &Path, figures: &Path) -> Result<Figure> {
    let kept_dir = figures.join(ARCHIVE_DIR).join(name);
    let live = Record::read(results_root.join(name));
    let kept = Record::read(kept_dir.clone());
    let mut figure = Figure {
        name: name.into(),
        row: None,
        images: Vec::new(),
    };
    let record = match (live, kept) {
        (Some(live), Some(kept)) if live.epochs() < kept.epochs() => {
            eprintln!(
                "{name}: {} has {} epochs, {} has {}: showing the kept run (remove {} to show the new one)",
                live.dir.display(),
                live.epochs(),
                kept.dir.display(),
                kept.epochs(),
                kept.dir.display()
            );
            kept
        }
        (Some(live), _) => {
            copy_figures(name, &live.dir, figures)?;
            keep_records(&live.dir, &kept_dir)?;
            live
        }
        (None, Some(kept)) => kept,
        (None, None) => return Ok(figure),
    };
    figure.images = figure_names(name)
        .into_iter()
        .filter(|f| figures.join(f).is_file())
        .collect();
    figure.row = Some(row(
        name,
        &record.info,
        record.epochs(),
        record.rows.last().map_or(f64::NAN, |r| r.test_bits_per_dim),
        &eval_cell(&record.dir, record.epochs()),
        record
            .rows
            .iter()
            .map(|r| r.train_seconds + r.test_seconds)
            .sum(),
    ));
    Ok(figure)
}

/// The names of a run's figures in `figures/`, in the order the README shows them.
fn figure_names(name: &str) -> [String; 4] {
    [
        format!("{name}-samples.png"),
        format!("{name}-reconstructions.png"),
        format!("{name}-curve.png"),
        format!("{name}-receptive-field.png"),
    ]
}

/// Copies the newest sample and reconstruction grids, the learning curve and (after `pixel eval
/// --receptive-field`) the receptive-field maps of a run.
fn copy_figures(name: &str, dir: &Path, figures: &Path) -> Result<()> {
    std::fs::create_dir_all(figures).map_err(Error::io(figures))?;
    let [samples, reconstructions, curve, field] = figure_names(name);
    for (from, to) in [
        (latest_grid(dir, "epoch-"), samples),
        (latest_grid(dir, "reconstructions-"), reconstructions),
        (Some(dir.join(results::CURVE_FILE)), curve),
        (Some(dir.join(crate::results::RECEPTIVE_PNG)), field),
    ] {
        if let Some(from) = from.filter(|p| p.is_file()) {
            let dest = figures.join(&to);
            std::fs::copy(&from, &dest).map_err(Error::io(&dest))?;
        }
    }
    Ok(())
}

/// Replaces the records kept in `kept` with those of the run in `dir`.
fn keep_records(dir: &Path, kept: &Path) -> Result<()> {
    std::fs::create_dir_all(kept).map_err(Error::io(kept))?;
    for file in ARCHIVED {
        let (from, to) = (dir.join(file), kept.join(file));
        if from.is_file() {
            std::fs::copy(&from, &to).map_err(Error::io(&to))?;
        } else if to.is_file() {
            std::fs::remove_file(&to).map_err(Error::io(&to))?;
        }
    }
    Ok(())
}

fn row(name: &str, info: &RunInfo, epochs: usize, test: f64, eval: &str, seconds: f64) -> String {
    format!(
        "| `{name}` | {epochs} | {test:.4} | {eval} | {} | {} | {} | {:.0} min | {} |",
        info.status_word(),
        info.device,
        if info.hardware.is_empty() {
            "?"
        } else {
            &info.hardware
        },
        seconds / 60.0,
        info.ended
            .as_deref()
            .unwrap_or(&info.started)
            .get(..10)
            .unwrap_or("?"),
    )
}

/// The table between the README's markers.
pub fn section(figures: &[Figure]) -> String {
    let mut out = format!(
        "{START}\n| experiment | epochs | test bits/dim | test NLL (`pixel eval`) | status | device | hardware | time | date |\n\
         |---|---:|---:|---:|---|---|---|---:|---|\n"
    );
    let mut missing = Vec::new();
    for f in figures {
        match &f.row {
            Some(r) => {
                out.push_str(r);
                out.push('\n');
            }
            None => missing.push(format!("`{}`", f.name)),
        }
    }
    out.push_str(
        "\nTest bits/dim: after the last epoch; for a PixelVAE the negative ELBO (one z per image), \
         whose importance-sampled estimate `pixel eval` gives when it has been run.\n",
    );
    if !missing.is_empty() {
        out.push_str(&format!("\nNot run here yet: {}.\n", missing.join(", ")));
    }
    out.push_str(END);
    out
}

/// The gallery between the results page's markers: each shown run's figures, linked from the
/// page's folder as `figures_link`.
pub fn gallery(figures: &[Figure], figures_link: &str) -> String {
    let mut out = GALLERY_START.to_string();
    out.push('\n');
    for f in figures.iter().filter(|f| !f.images.is_empty()) {
        out.push_str(&format!("\n**{}**\n\n", f.name));
        for img in &f.images {
            out.push_str(&format!("![{img}]({figures_link}/{img})\n"));
        }
    }
    out.push_str(GALLERY_END);
    out
}

/// Replaces the text between the `markers` of the file `path`, whose text is `text`.
pub fn rewrite(text: &str, section: &str, path: &Path, markers: (&str, &str)) -> Result<String> {
    let (start, end) = markers;
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        return Err(Error::Usage {
            flag: format!("{}", path.display()),
            message: format!("expected the markers {start} and {end}"),
        });
    };
    Ok(format!(
        "{}{}{}",
        &text[..a],
        section,
        &text[b + end.len()..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eval column: exact NLL, importance-sampled NLL with K, and a PixelVAE's active latent
    /// dimensions; "-" without a readable eval.json.
    #[test]
    fn eval_cells_say_what_was_measured() {
        let dir = tempfile::tempdir().unwrap();
        let cell = |json: &str| {
            std::fs::write(dir.path().join(crate::results::EVAL_FILE), json).unwrap();
            eval_cell(dir.path(), 15)
        };
        assert_eq!(cell(r#"{"test_bits_per_dim": 1.23456}"#), "1.2346");
        assert_eq!(
            cell(r#"{"test_bits_per_dim": 1.2, "importance_samples": 16}"#),
            "1.2000 (K = 16)"
        );
        assert_eq!(
            cell(
                r#"{"test_bits_per_dim": 1.2, "importance_samples": 16,
                    "active_latent_dimensions": 0, "latent_dimensions": 196}"#
            ),
            "1.2000 (K = 16; 0 of 196 latent dims active)"
        );
        assert_eq!(
            cell(r#"{"test_bits_per_dim": 1.2, "epochs": 15}"#),
            "1.2000"
        );
        assert_eq!(
            cell(r#"{"test_bits_per_dim": 1.2, "epochs": 12}"#),
            "1.2000, after epoch 12"
        );
        assert_eq!(cell("not json"), "-");
    }

    #[test]
    fn rewrites_only_between_the_markers() {
        let readme = format!("# X\nbefore\n{START}\nold\n{END}\nafter\n");
        let m = (START, END);
        let out = rewrite(
            &readme,
            &format!("{START}\nnew\n{END}"),
            Path::new("R.md"),
            m,
        )
        .unwrap();
        assert_eq!(out, format!("# X\nbefore\n{START}\nnew\n{END}\nafter\n"));
        assert!(rewrite("no markers", "", Path::new("R.md"), m).is_err());
    }

    #[test]
    fn figure_links_are_relative_to_the_page() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(r("docs", "docs/figures"), "figures");
        assert_eq!(r("docs", "figures"), "../figures");
        assert_eq!(r("", "docs/figures"), "docs/figures");
        assert_eq!(r("./docs/a", "./docs/b/c"), "../b/c");
    }

    #[test]
    fn missing_runs_are_reported_not_invented() {
        let dir = tempfile::tempdir().unwrap();
        let f = collect("absent", dir.path(), &dir.path().join("figures")).unwrap();
        assert!(f.row.is_none() && f.images.is_empty());
        let s = section(&[f]);
        assert!(s.contains("Not run here yet: `absent`."), "{s}");
    }
}
