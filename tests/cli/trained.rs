//! Commands on a trained run: `pixel sample`, `pixel eval` (and the receptive field), `pixel
//! figures`, `pixel bench`.

use super::*;

/// `pixel sample --count N` writes N single images and, with --npy, one array of the same bytes;
/// `--class` needs a class-conditional model.
#[test]
fn sample_count_writes_single_images_and_an_npy_array() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conditional = TINY.replace(
        "[model]\n",
        "[model]\nvariant = \"gated\"\nconditional = \"class\"\n",
    );
    std::fs::write(d.join("cond.toml"), conditional).unwrap();
    let out = pixel(d, &["run", "cond.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let args = [
        "sample",
        "results/cond",
        "--count",
        "5",
        "--npy",
        "--class",
        "3",
    ];
    let out = pixel(
        d,
        &[&args[..], &["--batch-size", "2", "--out", "draws"]].concat(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let npy = std::fs::read(d.join("draws/samples.npy")).unwrap();
    let len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = std::str::from_utf8(&npy[10..10 + len]).unwrap();
    assert!(header.contains("'shape': (5, 1, 6, 6)"), "{header}");
    let data = &npy[10 + len..];
    assert_eq!(data.len(), 5 * 36);
    for i in 0..5 {
        let png = d.join(format!("draws/sample-{i:05}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..36], &data[i * 36..(i + 1) * 36], "image {i}");
    }
    assert!(!d.join("draws/sample-00005.png").exists());
    // The same seed and batch size draw the same images.
    let again = pixel(
        d,
        &[&args[..], &["--batch-size", "2", "--out", "again"]].concat(),
    );
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(std::fs::read(d.join("again/samples.npy")).unwrap(), npy);

    std::fs::write(d.join("plain.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "plain.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(
        d,
        &["sample", "results/plain", "--count", "2", "--class", "3"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--class 3") && text(&out).contains("not class-conditional"));
    let out = pixel(
        d,
        &["sample", "results/plain", "--count", "2", "--class", "12"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn figures_copies_grids_and_curves_and_rewrites_the_table_and_the_gallery() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("experiments")).unwrap();
    std::fs::write(d.join("experiments/tiny.toml"), TINY).unwrap();
    std::fs::write(d.join("experiments/absent.toml"), TINY).unwrap();
    let readme = format!(
        "# Title\n\n{}\nstale\n{}\n\nrest\n",
        pixel_models::cmd::figures::START,
        pixel_models::cmd::figures::END
    );
    std::fs::write(d.join("README.md"), readme).unwrap();
    std::fs::create_dir(d.join("docs")).unwrap();
    let page = format!(
        "# Results\n\n{}\nstale\n{}\n",
        pixel_models::cmd::figures::GALLERY_START,
        pixel_models::cmd::figures::GALLERY_END
    );
    std::fs::write(d.join("docs/results.md"), page).unwrap();
    let out = pixel(d, &["run", "experiments/tiny.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["eval", "results/tiny"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not run: absent"), "{}", text(&out));
    let new = std::fs::read_to_string(d.join("README.md")).unwrap();
    assert!(
        new.starts_with("# Title\n\n") && new.ends_with("\n\nrest\n"),
        "{new}"
    );
    assert!(!new.contains("stale"));
    let row: Vec<&str> = new
        .lines()
        .find(|l| l.starts_with("| `tiny` | 2 |"))
        .unwrap_or_else(|| panic!("{new}"))
        .split(" | ")
        .collect();
    // `pixel eval` of a PixelCNN recomputes exactly the last epoch's test bits/dim.
    assert_eq!(row[2], row[3], "{new}");
    assert!(new.contains("| completed | flex:cpu |"), "{new}");
    assert!(new.contains("Not run here yet: `absent`."), "{new}");
    let gallery = std::fs::read_to_string(d.join("docs/results.md")).unwrap();
    assert!(
        gallery.starts_with("# Results\n\n")
            && !gallery.contains("stale")
            && gallery.contains("![tiny-samples.png](figures/tiny-samples.png)"),
        "{gallery}"
    );
    assert!(d.join("docs/figures/tiny-samples.png").is_file());
    assert!(d.join("docs/figures/tiny-curve.png").is_file());
    for kept in ["run.json", "metrics.csv", "eval.json"] {
        assert!(
            d.join("docs/figures/runs/tiny").join(kept).is_file(),
            "{kept}"
        );
    }
    // A clone without results/ (it is never tracked) rewrites the same table from the kept records.
    std::fs::rename(d.join("results"), d.join("results-elsewhere")).unwrap();
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(d.join("README.md")).unwrap(), new);
    assert_eq!(
        std::fs::read_to_string(d.join("docs/results.md")).unwrap(),
        gallery
    );
    // A run started over has fewer epochs than the kept one: the kept one stays in the table.
    let out = pixel(
        d,
        &["run", "experiments/tiny.toml", "--set", "train.epochs=1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(
        text(&out).contains("showing the kept run"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(d.join("README.md")).unwrap(), new);
    // Once it gets as far, the new run replaces it.
    std::fs::remove_dir_all(d.join("results")).unwrap();
    let out = pixel(
        d,
        &["run", "experiments/tiny.toml", "--set", "train.epochs=3"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    let newest = std::fs::read_to_string(d.join("README.md")).unwrap();
    assert!(
        newest.contains("| `tiny` | 3 |") && newest.contains(" | - | completed"),
        "{newest}"
    );
    // Without the markers: an error that says what is missing.
    std::fs::write(d.join("README.md"), "# none\n").unwrap();
    let out = pixel(d, &["figures"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("results:start"), "{}", text(&out));
}

#[test]
fn bench_reports_every_measure() {
    // Every model kind: a PixelVAE's forward pass encodes before it decodes.
    for (name, toml) in [("tiny", TINY), ("tiny-vae", TINY_VAE)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{name}.toml")), toml).unwrap();
        let file = format!("{name}.toml");
        let out = pixel(dir.path(), &["bench", &file, "--steps", "2"]);
        assert!(out.status.success(), "{name}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("| {name} | flex:cpu | f32 |")),
            "{stdout}"
        );
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(json["seconds_per_step"].as_f64().unwrap() > 0.0);
        assert!(json["grid_seconds"].as_f64().unwrap() > 0.0);
        assert!(json["forward_ms"].as_f64().unwrap() > 0.0);
        // Where a step's time goes: each phase measured, and together not more than a step.
        let phases = &json["step_phases_ms"];
        let ms = |k: &str| phases[k].as_f64().unwrap_or_else(|| panic!("{k}: {json}"));
        assert!(
            ms("forward") > 0.0 && ms("backward") > 0.0 && ms("update") > 0.0,
            "{json}"
        );
        assert!(ms("loss") >= 0.0, "{json}");
        let sum = ms("forward") + ms("loss") + ms("backward") + ms("update");
        let step = json["seconds_per_step"].as_f64().unwrap() * 1e3;
        assert!(sum < 1.5 * step, "phases {sum} ms, step {step} ms: {json}");
        assert!(
            stdout.contains("step phases (median ms): forward "),
            "{stdout}"
        );
        assert!(
            !dir.path().join("results").exists(),
            "bench writes no results"
        );
    }
}

/// In f16 the report counts the timed steps skipped for overflowing gradients (none in f32 and
/// bf16, which skip none).
#[test]
fn bench_counts_skipped_f16_steps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY).unwrap();
    for (precision, counted) in [("f16", true), ("f32", false)] {
        let set = format!("runtime.precision=\"{precision}\"");
        let args = [
            "bench",
            "tiny.toml",
            "--steps",
            "2",
            "--no-grid",
            "--set",
            &set,
        ];
        let out = pixel(dir.path(), &args);
        assert!(out.status.success(), "{precision}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let skipped = json["skipped_steps"].as_u64();
        assert_eq!(skipped.is_some(), counted, "{precision}: {json}");
        assert!(skipped.is_none_or(|n| n <= 2), "{json}");
    }
}

/// `--sync` waits for the device at each phase boundary and still reports every phase;
/// `--profile` is libtorch's: on flex it is refused before anything runs (exit code 2, the flag
/// and the backend named), and so is a trace in a folder that is not there.
#[test]
fn bench_syncs_phases_and_refuses_a_profile_it_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(
        d,
        &["bench", "tiny.toml", "--steps", "1", "--no-grid", "--sync"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        json["step_phases_ms"]["update"].as_f64().unwrap() > 0.0,
        "{json}"
    );

    let out = pixel(
        d,
        &[
            "bench",
            "tiny.toml",
            "--steps",
            "1",
            "--profile",
            "trace.json",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("--profile trace.json") && msg.contains("runtime.backend=libtorch"),
        "{msg}"
    );
    assert!(!d.join("trace.json").exists());
}

/// On libtorch, `--profile` writes a Chrome trace of 3 training steps, each a "step" range
/// holding libtorch's operators; a folder that is not there is refused first.
#[cfg(feature = "tch")]
#[test]
fn bench_profiles_three_steps_on_libtorch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let args = |trace: &'static str| {
        [
            "bench",
            "tiny.toml",
            "--steps",
            "1",
            "--no-grid",
            "--set",
            "runtime.backend=libtorch",
            "--profile",
            trace,
        ]
    };
    let out = pixel(d, &args("missing/trace.json"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("missing"), "{}", text(&out));

    let out = pixel(d, &args("trace.json"));
    assert!(out.status.success(), "{}", text(&out));
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let steps: Vec<&serde_json::Value> = events.iter().filter(|e| e["name"] == "step").collect();
    assert_eq!(steps.len(), 3, "{:?}", steps);
    let inside = |e: &serde_json::Value| {
        let ts = e["ts"].as_f64().unwrap_or(-1.0);
        steps.iter().any(|s| {
            let (start, dur) = (s["ts"].as_f64().unwrap(), s["dur"].as_f64().unwrap());
            ts >= start && ts <= start + dur
        })
    };
    let convolutions = events
        .iter()
        .filter(|e| e["name"] == "aten::convolution_backward" && inside(e))
        .count();
    assert!(
        convolutions >= 3,
        "{convolutions} convolution backward passes in the steps"
    );
    assert!(!d.join("trace.json.partial").exists());
}

/// A trained PixelCNN++ (logistic mixture, EMA, dropout): `pixel eval --receptive-field` writes a
/// PNG with one heat map per pixel and a JSON whose counts say the trained model sees no later
/// pixel and most of the earlier ones; `pixel eval` and `pixel sample` work on it as on the others.
#[test]
fn receptive_field_of_a_trained_pixelcnnpp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exp = repo().join("experiments/smoke/pixelcnnpp-synthetic-rgb.toml");
    let out = pixel(
        d,
        &[
            "run",
            exp.to_str().unwrap(),
            "--results",
            "results",
            "--set",
            "train.epochs=1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let run = d.join("results/pixelcnnpp-synthetic-rgb");
    let r = run.to_str().unwrap();
    let out = pixel(d, &["eval", r, "--receptive-field", "--images", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pixel (4, 4)"), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("receptive-field.json")).unwrap())
            .unwrap();
    assert_eq!(json["images"], 4);
    let fields = json["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 3);
    for f in fields {
        assert_eq!(f["later_pixels"], 0, "{f}");
        // A mixture's pixel depends on none of its own sub-pixels.
        assert_eq!(f["own_subpixels"], 0, "{f}");
        let (seen, earlier) = (
            f["nonzero_earlier"].as_u64().unwrap(),
            f["earlier_pixels"].as_u64().unwrap(),
        );
        assert!(seen <= earlier && seen * 2 > earlier, "{f}");
    }
    // Three 8x8 maps scaled 12 times, side by side with padding.
    let (w, h, colour) = png_size(&run.join("receptive-field.png"));
    assert_eq!(
        (w, h, colour),
        (3 * (96 + 2) + 2, 96 + 4, png::ColorType::Rgb)
    );
    // The flags of the other mode are refused with it.
    let out = pixel(d, &["eval", r, "--receptive-field", "--batch-size", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = pixel(d, &["eval", r, "--images", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = pixel(d, &["eval", r, "--receptive-field", "--images", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--images 0"), "{}", text(&out));
    // The exact NLL and samples from the averaged weights.
    let out = pixel(d, &["eval", r]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(exact)"), "{}", text(&out));
    let out = pixel(d, &["sample", r, "--count", "3"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A run with `train.ema` whose checkpoint lost its averaged weights: `pixel eval` and `pixel
/// sample` say so and stop (exit 2) rather than use the trained weights in their place; a weights
/// file cut short is reported as damaged, not as a model that does not fit.
#[test]
fn eval_and_sample_refuse_a_checkpoint_without_its_average_or_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "train.epochs=1",
            "--set",
            "train.ema=0.9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let ckpt = d.join("results/tiny/checkpoints/0001-000000");
    let ema = std::fs::read(ckpt.join("ema.bpk")).unwrap();
    std::fs::remove_file(ckpt.join("ema.bpk")).unwrap();
    for args in [
        vec!["eval", "results/tiny"],
        vec!["sample", "results/tiny", "--count", "2", "--out", "draws"],
    ] {
        let out = pixel(d, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("ema.bpk: damaged: missing"),
            "{}",
            text(&out)
        );
    }
    assert!(!d.join("results/tiny/eval.json").exists());
    assert!(!d.join("draws").exists());
    std::fs::write(ckpt.join("ema.bpk"), &ema[..ema.len() - 10]).unwrap();
    let out = pixel(d, &["eval", "results/tiny"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("damaged") && text(&out).contains("cut short"),
        "{}",
        text(&out)
    );
    std::fs::write(ckpt.join("ema.bpk"), &ema).unwrap();
    let out = pixel(d, &["eval", "results/tiny"]);
    assert!(out.status.success(), "{}", text(&out));
}
