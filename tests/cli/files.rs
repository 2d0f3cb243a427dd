//! The files users see in the repository: schemas, shipped experiments, the bundled data.

use super::*;

#[test]
fn schema_file_is_fresh() {
    let path = repo().join("schemas/experiment.schema.json");
    let current = pixel_models::experiment::schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == current,
        "schemas/experiment.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test cli schema` \
         or `pixel schema > schemas/experiment.schema.json`"
    );
}

#[test]
fn sweep_schema_file_is_fresh() {
    let path = repo().join("schemas/sweep.schema.json");
    let current = pixel_models::experiment::sweep::schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    assert!(
        std::fs::read_to_string(&path).unwrap_or_default() == current,
        "schemas/sweep.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test cli schema`"
    );
}

/// The reference page is generated from the schemas and kept current.
#[test]
fn reference_page_is_fresh() {
    let path = repo().join("docs/reference.md");
    let current = pixel_models::experiment::reference::markdown();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    assert!(
        std::fs::read_to_string(&path).unwrap_or_default() == current,
        "docs/reference.md is stale: run `UPDATE_SCHEMA=1 cargo test --test cli schema` or \
         `pixel schema --reference > docs/reference.md`"
    );
    for key in [
        "`model.pixelcnnpp.dropout`",
        "`train.adam_betas`",
        "`slurm.ranks`",
    ] {
        assert!(current.contains(key), "{key} in the reference");
    }
}

#[test]
fn every_shipped_experiment_has_a_schema_line_and_checks() {
    let mut files = Vec::new();
    for dir in [
        "experiments",
        "experiments/smoke",
        "experiments/sweeps",
        "experiments/smoke/sweeps",
    ] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 5);
    for f in &files {
        let first = std::fs::read_to_string(f).unwrap();
        assert!(
            first.starts_with("#:schema "),
            "{} lacks a #:schema line",
            f.display()
        );
    }
    let out = pixel(&repo(), &["check", "experiments"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches("ok ").count(),
        files.len(),
        "{}",
        text(&out)
    );
}

#[test]
fn bundled_mnist_sample_decodes_to_known_images() {
    let dir = repo().join("assets/mnist-sample");
    let s = mnist::load(&dir).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (2000, 500));
    assert_eq!(&s.train.labels[..10], &[5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert_eq!(&s.test.labels[..5], &[7, 2, 1, 0, 4]);
    let first = s.train.image(0);
    assert_eq!(
        (first[6 * 28 + 12], first[14 * 28 + 14], first[0]),
        (170, 240, 0)
    );
    assert_eq!(first.iter().map(|&p| u32::from(p)).sum::<u32>(), 27525);
    assert_eq!(
        s.test.image(0).iter().map(|&p| u32::from(p)).sum::<u32>(),
        18454
    );
    assert_eq!(
        s.test.image(499).iter().map(|&p| u32::from(p)).sum::<u32>(),
        12770
    );
}
