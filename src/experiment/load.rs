//! Reading an experiment: defaults <- file <- `PIXEL_*` environment <- `--set key=value`.

use super::Experiment;
use crate::error::{Error, Result};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One value that did not come from the experiment file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// Dotted key, e.g. `train.epochs`.
    pub key: String,
    /// The value as TOML.
    pub value: String,
    /// `--set` or the environment variable's name.
    pub origin: String,
}

/// Parses a `--set key=value` argument. The value is read as TOML (`3`, `1e-4`, `true`, `"x"`),
/// and as a plain string when it is not valid TOML (`--set data.dataset=cifar10`).
pub fn parse_set(arg: &str) -> Result<Override> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(Error::Usage {
            flag: format!("--set {arg}"),
            message: "expected KEY=VALUE, e.g. --set train.epochs=3".into(),
        });
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(Error::Usage {
            flag: format!("--set {arg}"),
            message: "expected a dotted key such as train.epochs before `=`".into(),
        });
    }
    let value = value.trim();
    let value = match toml_value(value) {
        Some(v) => v.to_string(),
        None => toml::Value::String(value.to_string()).to_string(),
    };
    Ok(Override {
        key: key.to_string(),
        value,
        origin: "--set".into(),
    })
}

fn toml_value(text: &str) -> Option<toml::Value> {
    let doc: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    doc.get("v").cloned()
}

/// Loads an experiment file and applies the environment and `--set` overrides.
/// Returns the resolved experiment and every override that changed it.
pub fn load(path: &Path, sets: &[Override]) -> Result<(Experiment, Vec<Override>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    parse(&text, path, sets)
}

/// [`load`] for text already read from `path` (which names the file in errors).
pub fn parse(text: &str, path: &Path, sets: &[Override]) -> Result<(Experiment, Vec<Override>)> {
    layer(text, path, true, sets)
}

/// Loads an experiment recorded in a results folder as it is, with `sets` but without the
/// environment layer: what resumes, evaluates and samples a run is what the run recorded.
pub fn load_recorded(path: &Path, sets: &[Override]) -> Result<(Experiment, Vec<Override>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    layer(&text, path, false, sets)
}

/// Only PIXEL_<SECTION>__<KEY> variables are overrides: PIXEL_DATA (the data folder) and other
/// PIXEL_* variables are not.
fn environment() -> Env {
    Env::prefixed("PIXEL_")
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

/// The overrides the environment sets now (`PIXEL_TRAIN__EPOCHS=3` and the like).
pub fn environment_overrides() -> Vec<Override> {
    environment()
        .iter()
        .map(|(key, value)| Override {
            key: key.to_string(),
            value: value.to_string(),
            origin: format!("PIXEL_{}", key.as_str().to_uppercase().replace('.', "__")),
        })
        .collect()
}

fn layer(
    text: &str,
    path: &Path,
    with_environment: bool,
    sets: &[Override],
) -> Result<(Experiment, Vec<Override>)> {
    check_file(path, text)?;
    let mut figment =
        Figment::from(Serialized::defaults(Experiment::default())).merge(Toml::string(text));
    let mut overrides = Vec::new();
    if with_environment {
        overrides = environment_overrides();
        figment = figment.merge(environment());
    }
    for set in sets {
        let value = toml_value(&set.value).expect("parse_set produced valid TOML");
        figment = figment.merge(Serialized::default(&set.key, value));
        overrides.push(set.clone());
    }
    let experiment: Experiment = figment.extract().map_err(|e| {
        let key = e.path.join(".");
        let origin = overrides
            .iter()
            .rev()
            .find(|o| o.key == key || key.starts_with(&format!("{}.", o.key)))
            .map(|o| o.origin.clone())
            .unwrap_or_else(|| path.display().to_string());
        let value = overrides
            .iter()
            .rev()
            .find(|o| o.key == key)
            .map(|o| o.value.clone())
            .unwrap_or_else(|| "?".into());
        Error::Rejected {
            source_name: origin,
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key
            },
            value,
            message: match &e.kind {
                figment::error::Kind::UnknownField(found, expected) => {
                    let mut text = format!("one of {}", expected.join(", "));
                    if let Some(cand) = did_you_mean(found, expected) {
                        text.push_str(&format!("; did you mean `{cand}`?"));
                    }
                    format!("unknown key `{found}`: expected {text}")
                }
                kind => plain_types(&kind.to_string()),
            },
        }
    })?;
    Ok((experiment, overrides))
}

/// Deserialises the file on its own first, so that syntax errors, unknown keys and wrong types are
/// reported with a line and column, and with the dotted key serde was reading (however the file
/// spells it: a table, a dotted key or an inline table).
fn check_file(path: &Path, text: &str) -> Result<()> {
    let parsed = toml::Deserializer::parse(text)
        .map_err(|e| (e, None))
        .and_then(|d| {
            serde_path_to_error::deserialize::<_, Experiment>(d)
                .map_err(|e| (key_of(e.path()), e.into_inner()))
                .map_err(|(key, e)| (e, key))
        });
    let Err((e, key)) = parsed else {
        return Ok(());
    };
    let (line, column) = e
        .span()
        .map(|span| line_column(text, span.start))
        .unwrap_or((1, 1));
    let mut message = plain_types(&unknown_key_hint(e.message().trim()));
    if let Some(key) = key {
        message = format!("`{key}`: {message}");
    }
    Err(Error::Parse {
        file: path.to_path_buf(),
        line,
        column,
        message,
    })
}

/// The dotted key of a value serde could not read (`train.epochs`); none for an unknown key, whose
/// message names it, or at the top.
fn key_of(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let parts: Vec<String> = path
        .iter()
        .map(|s| match s {
            Segment::Map { key } => key.clone(),
            Segment::Seq { index } => format!("[{index}]"),
            _ => "?".into(),
        })
        .collect();
    let key = parts.join(".").replace(".[", "[");
    (!key.is_empty() && !key.contains('?')).then_some(key)
}

/// Adds "did you mean" to serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn unknown_key_hint(message: &str) -> String {
    let Some(rest) = message.split_once("unknown field").map(|(_, r)| r) else {
        return message.to_string();
    };
    let Some(unknown) = rest.split('`').nth(1) else {
        return message.to_string();
    };
    let candidates: Vec<&str> = rest
        .split_once("expected")
        .map(|(_, e)| e.split('`').filter(|t| is_identifier(t)).collect())
        .unwrap_or_default();
    match did_you_mean(unknown, &candidates) {
        Some(cand) => format!("{message}; did you mean `{cand}`?"),
        None => message.to_string(),
    }
}

fn is_identifier(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Rust type names in serde's messages, in words.
fn plain_types(message: &str) -> String {
    message
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
}

/// The closest candidate to a misspelt key, if one is close enough.
fn did_you_mean<'a>(unknown: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|cand| (strsim::levenshtein(unknown, cand), *cand))
        .filter(|(d, cand)| *d <= 2.max(cand.len() / 3))
        .min()
        .map(|(_, cand)| cand)
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_filled() {
        let f = write("[model]\nlayers = 3\n");
        let (e, _) = load(f.path(), &[]).unwrap();
        assert_eq!(e.model.layers, 3);
        assert_eq!(e.model.kernel, 5);
        assert_eq!(e.train.batch_size, 64);
        assert_eq!(e.runtime.device, "auto");
    }

    #[test]
    fn unknown_key_names_key_file_line_and_suggestion() {
        let f = write("[model]\nlayers = 3\nkernal = 5\n");
        let err = load(f.path(), &[]).unwrap_err().to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        assert!(err.contains(":3:"), "{err}");
        assert!(err.contains("kernal"), "{err}");
        assert!(err.contains("did you mean `kernel`"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let f = write("[train]\nepochs = \"ten\"\n");
        let err = load(f.path(), &[]).unwrap_err().to_string();
        assert!(err.contains(":2:"), "{err}");
        assert!(err.contains("`train.epochs`"), "{err}");
    }

    /// The key is serde's path, however the file writes it: a dotted key at the top, an inline
    /// table, an array element.
    #[test]
    fn wrong_types_name_the_key_however_it_is_written() {
        for (text, key) in [
            ("train.epochs = \"ten\"\n", "`train.epochs`"),
            ("train = { epochs = \"ten\" }\n", "`train.epochs`"),
            (
                "[train]\nadam_betas = [0.9, \"x\"]\n",
                "`train.adam_betas[1]`",
            ),
            ("[model.vae]\nhidden = -3\n", "`model.vae.hidden`"),
        ] {
            let f = write(text);
            let err = load(f.path(), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let f = write("[model]\nlayers = = 3\n");
        let err = load(f.path(), &[]).unwrap_err();
        assert!(matches!(err, Error::Parse { line: 2, .. }), "{err}");
    }

    #[test]
    fn set_overrides_file_and_is_recorded() {
        let f = write("[train]\nepochs = 4\n");
        let sets = [
            parse_set("train.epochs=2").unwrap(),
            parse_set("data.dataset=synthetic").unwrap(),
        ];
        let (e, overrides) = load(f.path(), &sets).unwrap();
        assert_eq!(e.train.epochs, 2);
        assert_eq!(e.data.dataset, super::super::DatasetKind::Synthetic);
        assert!(
            overrides
                .iter()
                .any(|o| o.key == "train.epochs" && o.value == "2")
        );
    }

    #[test]
    fn set_with_unknown_key_names_the_flag() {
        let f = write("");
        let err = load(f.path(), &[parse_set("train.epoch=2").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set"), "{err}");
        assert!(err.contains("epoch"), "{err}");
        assert!(err.contains("did you mean `epochs`"), "{err}");
    }

    #[test]
    fn set_without_equals_is_a_usage_error() {
        assert!(matches!(
            parse_set("train.epochs"),
            Err(Error::Usage { .. })
        ));
    }

    #[test]
    fn resolved_experiment_round_trips_through_toml() {
        let f = write("[model]\nchannels = 12\n[data]\npath = \"somewhere\"\n");
        let (e, _) = load(f.path(), &[]).unwrap();
        let text = toml::to_string(&e).unwrap();
        let back: Experiment = toml::from_str(&text).unwrap();
        assert_eq!(back, e);
    }
}
