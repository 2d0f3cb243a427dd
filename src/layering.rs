//! The direction of imports, checked: every `crate::` path in `src/` points to a module of a lower
//! layer than the file's own (or to its own module). Lower layers never see the file format, the
//! commands or the run, and no two modules import each other.

use std::collections::BTreeSet;
use std::path::Path;

/// Top-level modules from the bottom layer up. A module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["rng", "cluster", "atomic", "progress"],
    &["device"],
    &["data", "model"],
    &["loss", "optim"],
    &["train", "sample"],
    &["error"],
    &["experiment"],
    &["results", "checkpoint"],
    &["session"],
    &["run"],
    &["cmd"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The first segment of every `crate::` path in `text`, groups (`crate::{a, b::C}`) included.
fn imported_modules(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        // `pixel_models::crate` does not occur; `$crate::` (macros) is not ours.
        if text[..at].ends_with('$') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split on commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "lib" | "main" | "layering") {
            continue;
        }
        let own = layer(&module)
            .unwrap_or_else(|| panic!("{module} (src/{}) is in no layer", relative.display()));
        let text = std::fs::read_to_string(file).unwrap();
        for target in imported_modules(&text) {
            checked += 1;
            if target == module || matches!(target.as_str(), "Error" | "Result") {
                continue;
            }
            match layer(&target) {
                Some(l) if l < own => {}
                _ => wrong.push(format!(
                    "src/{} ({module}) imports crate::{target}",
                    relative.display()
                )),
            }
        }
    }
    assert!(checked > 50, "the scan found only {checked} imports");
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_reads_groups_and_inline_paths() {
    let text = "use crate::{data::{self, Images}, model};\nlet x = crate::run::go();";
    let found: Vec<String> = imported_modules(text).into_iter().collect();
    assert_eq!(found, ["data", "model", "run"]);
}
