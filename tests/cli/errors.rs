//! Bad input of every kind: exit code 2, a message that names the file, key or flag and the
//! value, and nothing written.

use super::*;

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown.toml",
            "[model]\nlayrs = 3\n",
            &["unknown.toml:2:1", "did you mean `layers`"],
        ),
        (
            "type.toml",
            "[train]\nepochs = \"many\"\n",
            &["type.toml:2:", "`train.epochs`"],
        ),
        ("syntax.toml", "[model\n", &["syntax.toml:1:"]),
        (
            "even.toml",
            "[model]\nkernel = 4\n[data]\ndataset = \"synthetic\"\n",
            &["`model.kernel` = 4", "odd"],
        ),
        (
            "channels.toml",
            "[model]\nchannels = 10\n[data]\ndataset = \"synthetic\"\nsynthetic_colours = 3\n",
            &["`model.channels` = 10", "multiple of 3"],
        ),
        (
            "nodata.toml",
            "[data]\ndataset = \"mnist\"\npath = \"nowhere\"\ndownload = false\n",
            &[
                "dataset `mnist` not found",
                "nowhere",
                "t10k-labels-idx1-ubyte",
            ],
        ),
        (
            "variant.toml",
            "[model]\nvariant = \"pixelsnail\"\n",
            &["variant.toml:2:", "`model.variant`", "simple"],
        ),
    ];
    for (name, body, expected) in cases {
        std::fs::write(dir.path().join(name), body).unwrap();
        let out = pixel(dir.path(), &["run", name]);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {msg}");
        for e in *expected {
            assert!(msg.contains(e), "{name}: expected {e:?} in {msg}");
        }
        assert!(
            msg.lines().count() < 25,
            "{name}: one screen at most: {msg}"
        );
    }
    let out = pixel(dir.path(), &["run", "even.toml", "--set", "train.epochs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("KEY=VALUE"));
    let out = pixel(dir.path(), &["run", "missing.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("missing.toml"));
    assert!(
        !dir.path().join("results").exists(),
        "nothing written for bad input"
    );
}

#[test]
fn check_reports_every_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("good.toml"), TINY).unwrap();
    std::fs::write(dir.path().join("sub/bad.toml"), "[train]\nbatch_size = 0\n").unwrap();
    std::fs::write(dir.path().join("sub/good.toml"), TINY).unwrap();
    let out = pixel(dir.path(), &["check", "."]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(msg.contains("`train.batch_size` = 0"), "{msg}");
    assert!(
        msg.contains("results folder name `good` is already used"),
        "{msg}"
    );
}

#[test]
fn conflicting_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["run", "a.toml", "--resume", "results/a"],
        vec!["run", "--resume", "results/a", "--force"],
        vec!["run", "--resume", "results/a", "--set", "train.epochs=1"],
        vec!["run"],
    ] {
        let out = pixel(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    let out = pixel(dir.path(), &["run", "--resume", "nowhere"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("nowhere"), "{}", text(&out));
}

/// Fifty-odd mistakes a user can make. Each must exit with 2, print a short error that quotes what
/// is wrong, and write nothing.
#[test]
fn bad_inputs_each_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data files for the dataset cases.
    let imgs = pixel_models::data::Images {
        pixels: vec![7; 3 * 28 * 28],
        labels: vec![1, 2, 3],
        colours: 1,
        height: 28,
        width: 28,
    };
    for (name, corrupt) in [("mnist-truncated", true), ("mnist-magic", false)] {
        let m = d.join(name);
        std::fs::create_dir(&m).unwrap();
        for (i, l) in [
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ] {
            mnist::write_idx(&imgs, &m.join(i), &m.join(l)).unwrap();
        }
        let f = m.join("train-images-idx3-ubyte");
        let mut bytes = std::fs::read(&f).unwrap();
        if corrupt {
            bytes.truncate(bytes.len() - 100);
        } else {
            bytes[3] = 9;
        }
        std::fs::write(&f, bytes).unwrap();
    }
    let cifar = d.join("cifar-truncated");
    std::fs::create_dir(&cifar).unwrap();
    for f in pixel_models::data::cifar10::FILES {
        std::fs::write(cifar.join(f), vec![1u8; 3073 * 2 - 10]).unwrap();
    }
    for (name, second) in [
        ("folder-sizes", vec![0u8; 3 * 20]),
        ("folder-broken", vec![]),
    ] {
        let sub = d.join(name).join("train/x");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(d.join(name).join("valid/x")).unwrap();
        pixel_models::results::png::write_rgb_or_grey(&sub.join("a.png"), &[0; 48], 3, 4, 4)
            .unwrap();
        if second.is_empty() {
            std::fs::write(sub.join("b.png"), b"\x89PNG garbage").unwrap();
        } else {
            pixel_models::results::png::write_rgb_or_grey(&sub.join("b.png"), &second, 3, 4, 5)
                .unwrap();
        }
    }
    std::fs::write(d.join("not-a-folder"), "x").unwrap();
    // Degenerate and mismatched files: train images of height 0; a 20x20 test set beside a 28x28
    // train set; a folder of 4x8 images cropped to 6.
    for (name, train_height, test_side) in [("mnist-height0", 0, 28), ("mnist-mismatch", 28, 20)] {
        let m = d.join(name);
        std::fs::create_dir(&m).unwrap();
        let split = |height: usize, width: usize| pixel_models::data::Images {
            pixels: vec![7; 3 * height * width],
            labels: vec![1, 2, 3],
            colours: 1,
            height,
            width,
        };
        let (i, l) = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte");
        mnist::write_idx(&split(train_height, 28), &m.join(i), &m.join(l)).unwrap();
        let (i, l) = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte");
        mnist::write_idx(&split(test_side, test_side), &m.join(i), &m.join(l)).unwrap();
    }
    for split in ["train/x", "valid/x"] {
        let sub = d.join("folder-wide").join(split);
        std::fs::create_dir_all(&sub).unwrap();
        pixel_models::results::png::write_rgb_or_grey(&sub.join("a.png"), &[9; 96], 3, 4, 8)
            .unwrap();
    }

    let syn = "[data]\ndataset = \"synthetic\"\n";
    let rgb = "[data]\ndataset = \"synthetic\"\nsynthetic_colours = 3\n";
    #[rustfmt::skip]
    let cases: Vec<(String, Vec<&str>, Vec<&str>)> = vec![
        ("[model\n".into(), vec![], vec![":1:"]),
        ("[model]\nlayers = = 3\n".into(), vec![], vec![":2:"]),
        ("epochs = 3\n".into(), vec![], vec!["`epochs`", ":1:1"]),
        ("[optim]\nlr = 1\n".into(), vec![], vec!["`optim`"]),
        ("[model]\nlayrs = 3\n".into(), vec![], vec!["did you mean `layers`"]),
        ("[data]\ndatset = \"mnist\"\n".into(), vec![], vec!["did you mean `dataset`"]),
        ("[train]\nepoch = 3\n".into(), vec![], vec!["did you mean `epochs`"]),
        ("[sample]\ntemprature = 1.0\n".into(), vec![], vec!["did you mean `temperature`"]),
        ("[runtime]\ndevise = \"cpu\"\n".into(), vec![], vec!["did you mean `device`"]),
        ("[model]\nlayers = \"five\"\n".into(), vec![], vec!["`model.layers`", "integer"]),
        ("[train]\nlearning_rate = \"fast\"\n".into(), vec![], vec!["`train.learning_rate`", "number"]),
        ("[train]\nseed = -1\n".into(), vec![], vec!["`train.seed`"]),
        ("[data]\ndownload = \"yes\"\n".into(), vec![], vec!["`data.download`", "bool"]),
        ("model = 3\n".into(), vec![], vec!["`model`"]),
        ("[model]\nvariant = \"pixelsnail\"\n".into(), vec![], vec!["`model.variant`", "gated"]),
        ("[data]\ndataset = \"imagenet\"\n".into(), vec![], vec!["`data.dataset`", "cifar10"]),
        ("[runtime]\nbackend = \"cuda\"\n".into(), vec![], vec!["`runtime.backend`", "libtorch"]),
        ("[runtime]\nprecision = \"f8\"\n".into(), vec![], vec!["`runtime.precision`", "bf16"]),
        ("[model]\nconditional = \"label\"\n".into(), vec![], vec!["`model.conditional`", "class"]),
        (format!("{syn}[model]\nlayers = 0\n"), vec![], vec!["`model.layers` = 0"]),
        (format!("{syn}[model]\nkernel = 4\n"), vec![], vec!["`model.kernel` = 4", "odd"]),
        (format!("{syn}[model]\nkernel = 0\n"), vec![], vec!["`model.kernel` = 0"]),
        (format!("{syn}[model]\nchannels = 0\n"), vec![], vec!["`model.channels` = 0"]),
        (format!("{rgb}[model]\nchannels = 10\n"), vec![], vec!["`model.channels` = 10", "multiple of 3"]),
        ("[data]\ndataset = \"cifar10\"\n[model]\nchannels = 31\n".into(), vec![], vec!["`model.channels` = 31"]),
        (format!("{syn}[train]\nbatch_size = 0\n"), vec![], vec!["`train.batch_size` = 0"]),
        (format!("{syn}[train]\neval_batch_size = 0\n"), vec![], vec!["`train.eval_batch_size` = 0"]),
        (format!("{syn}[train]\nlearning_rate = -0.1\n"), vec![], vec!["`train.learning_rate` = -0.1"]),
        (format!("{syn}[train]\nlearning_rate = 0.0\n"), vec![], vec!["`train.learning_rate` = 0"]),
        (format!("{syn}[train]\nlearning_rate = nan\n"), vec![], vec!["`train.learning_rate` = NaN"]),
        (format!("{syn}[train]\nepochs = 0\n"), vec![], vec!["`train.epochs` = 0"]),
        (format!("{syn}[train]\nkeep_checkpoints = 0\n"), vec![], vec!["`train.keep_checkpoints` = 0"]),
        (format!("{syn}[sample]\ntemperature = 0.0\n"), vec![], vec!["`sample.temperature` = 0"]),
        (format!("{syn}[sample]\ntemperature = -1.0\n"), vec![], vec!["`sample.temperature` = -1"]),
        (format!("{syn}[sample]\ngrid = 5\n"), vec![], vec!["`sample.grid` = 5", "even"]),
        (format!("{syn}[sample]\ngrid = 0\n"), vec![], vec!["`sample.grid` = 0"]),
        (format!("{syn}[sample]\ngrid = 100000\n"), vec![], vec!["`sample.grid` = 100000", "to 64"]),
        (format!("{syn}[model]\nchannels = 1000000000\n"), vec![], vec!["channels = 1000000000", "GiB", "runtime.allow_large"]),
        (format!("{syn}[model]\nlayers = 100000\n"), vec![], vec!["layers = 100000", "parameters", "runtime.allow_large"]),
        (format!("{syn}[runtime]\ndevice = \"gpu\"\n"), vec![], vec!["`runtime.device` = \"gpu\""]),
        (format!("{syn}[runtime]\ndevice = \"cuda:x\"\n"), vec![], vec!["`runtime.device` = \"cuda:x\""]),
        (format!("{syn}[runtime]\ndevice = \"cuda\"\n"), vec![], vec!["`runtime.device`", "libtorch"]),
        (format!("{syn}[runtime]\ncuda_graph = true\n"), vec![], vec!["`runtime.cuda_graph` = true", "CUDA"]),
        (format!("{syn}[model]\nconditional = \"class\"\n"), vec![], vec!["`model.conditional`", "gated"]),
        ("[model]\nlikelihood = \"gaussian\"\n".into(), vec![], vec!["`model.likelihood`", "logistic_mixture"]),
        (format!("{rgb}[model]\nvariant = \"gated\"\nlikelihood = \"logistic_mixture\"\nchannels = 30\n"), vec![], vec!["`model.likelihood`", "pixelcnnpp"]),
        (format!("{syn}[model]\nlikelihood = \"logistic_mixture\"\nmixtures = 0\n"), vec![], vec!["`model.mixtures` = 0"]),
        (format!("{syn}[model]\nmixtures = 3\n"), vec![], vec!["`model.mixtures` = 3", "categorical"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\nkernel = 3\n"), vec![], vec!["`model.kernel` = 3", "resnets"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n[model.pixelcnnpp]\ndropout = 1.0\n"), vec![], vec!["`model.pixelcnnpp.dropout` = 1"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n[model.pixelcnnpp]\nresnet = 1\n"), vec![], vec!["did you mean `resnets`"]),
        (format!("{syn}[model.pixelcnnpp]\nresnets = 1\n"), vec![], vec!["no [model.pixelcnnpp] table"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\nchannels = 100000\n[model.pixelcnnpp]\nresnets = 50\n"), vec![], vec!["GiB", "runtime.allow_large"]),
        (format!("{syn}[model.vae]\nlatent_channels = 8\n"), vec![], vec!["`model.vae`", "variant = \"vae\""]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nfree_bits = -1.0\n"), vec![], vec!["`model.vae.free_bits` = -1"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nlatent_channels = 0\n"), vec![], vec!["`model.vae.latent_channels` = 0"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nconditioning = \"film\"\n"), vec![], vec!["model.vae.conditioning", "film"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nlatent = 3\n"), vec![], vec!["latent", "latent_channels"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-sizes\"\n[model]\nvariant = \"gated\"\nconditional = \"class\"\n".into(), vec![], vec!["`model.conditional`", "folder"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_colours = 2\n".into(), vec![], vec!["`data.synthetic_colours` = 2"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_size = 1\n".into(), vec![], vec!["`data.synthetic_size` = 1"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_images = 0\n".into(), vec![], vec!["`data.synthetic_images` = 0"]),
        ("[data]\ndataset = \"cifar10\"\ncrop = 40\ndownload = false\n".into(), vec![], vec!["`data.crop` = 40", "32"]),
        (format!("{syn}crop = 1\n"), vec![], vec!["`data.crop` = 1"]),
        ("[data]\npath = \"nowhere\"\ndownload = false\n".into(), vec![], vec!["`mnist` not found", "nowhere", "train-images-idx3-ubyte"]),
        ("[data]\ndataset = \"cifar10\"\npath = \"nowhere\"\ndownload = false\n".into(), vec![], vec!["`cifar10` not found", "data_batch_1.bin"]),
        ("[data]\ndataset = \"folder\"\n".into(), vec![], vec!["`folder` not found", "data.path"]),
        ("[data]\npath = \"mnist-truncated\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "truncated"]),
        ("[data]\npath = \"mnist-magic\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "wrong magic number"]),
        ("[data]\ndataset = \"cifar10\"\npath = \"cifar-truncated\"\n".into(), vec![], vec!["data_batch_1.bin", "truncated"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-sizes\"\n".into(), vec![], vec!["b.png", "expected 4x4"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-broken\"\n".into(), vec![], vec!["b.png", "unreadable PNG"]),
        ("[data]\npath = \"mnist-height0\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "0x28 pixels", "at least 2x2"]),
        ("[data]\npath = \"mnist-mismatch\"\n".into(), vec![], vec!["mnist-mismatch", "1x28x28", "1x20x20"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-wide\"\ncrop = 6\n".into(), vec![], vec!["`data.crop` = 6", "4x8", "at most 4"]),
        (syn.into(), vec!["--set", "train.epochs"], vec!["--set train.epochs", "KEY=VALUE"]),
        (syn.into(), vec!["--set", "=3"], vec!["--set =3", "dotted key"]),
        (syn.into(), vec!["--set", "train.epoch=3"], vec!["--set", "did you mean `epochs`"]),
        (syn.into(), vec!["--set", "train.epochs=many"], vec!["--set", "`train.epochs` = \"many\""]),
        (syn.into(), vec!["--set", "model.kernel=6"], vec!["--set (overriding", "`model.kernel` = 6"]),
        // A size that cannot fit is blamed on the flag that set it, variant-specific keys included.
        (syn.into(), vec!["--set", "model.channels=300000"], vec!["--set (overriding", "`model.channels` = 300000 (with model.layers", "GiB"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n"), vec!["--set", "model.pixelcnnpp.resnets=100000"], vec!["--set (overriding", "`model.pixelcnnpp.resnets` = 100000", "GiB"]),
        (syn.into(), vec!["--results", "not-a-folder"], vec!["not-a-folder"]),
        (syn.into(), vec!["--bogus"], vec!["--bogus"]),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for (i, (body, args, expected)) in cases.iter().enumerate() {
        let file = format!("case{i:02}.toml");
        std::fs::write(d.join(&file), body).unwrap();
        let mut all = vec!["run", file.as_str()];
        all.extend(args.iter().copied());
        let out = pixel(d, &all);
        let msg = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "case {i} ({body:?} {args:?}): {msg}"
        );
        for e in expected {
            assert!(
                msg.contains(e),
                "case {i} ({body:?} {args:?}): expected {e:?} in:\n{msg}"
            );
        }
        // The error names the experiment file or the data file it is about (flags name themselves).
        if args.is_empty() {
            let tmp = d.to_string_lossy();
            assert!(
                msg.contains(&file) || msg.contains(tmp.as_ref()),
                "case {i}: neither the experiment nor a data file is named:\n{msg}"
            );
        }
        assert!(
            msg.lines().count() <= 12,
            "case {i}: more than a screen:\n{msg}"
        );
        assert!(!d.join("results").exists(), "case {i} wrote results");
    }

    // Environment overrides with a wrong type name the variable.
    std::fs::write(d.join("env.toml"), syn).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "env.toml"])
        .current_dir(d)
        .env("PIXEL_TRAIN__EPOCHS", "abc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("PIXEL_TRAIN__EPOCHS"), "{}", text(&out));
    // A folder given as the experiment.
    let out = pixel(d, &["run", "mnist-magic"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("mnist-magic"), "{}", text(&out));
    assert!(!d.join("results").exists());
}

#[test]
fn commands_on_a_finished_run_check_their_flags_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "tiny.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = "results/tiny";
    for (args, expected) in [
        (
            vec!["eval", run, "--batch-size", "0"],
            vec!["--batch-size 0", "at least 1"],
        ),
        (
            vec!["sample", run, "--temperature", "-1"],
            vec!["--temperature", "`sample.temperature` = -1", "positive"],
        ),
        (
            vec!["sample", run, "--temperature", "0"],
            vec!["`sample.temperature` = 0"],
        ),
        // More images than any disk holds: refused before sampling, nothing written.
        (
            vec!["sample", run, "--count", "1000000000000000", "--npy"],
            vec![
                "--count 1000000000000000",
                "GiB free",
                "(PNGs and samples.npy)",
            ],
        ),
        (
            vec!["sample", run, "--count", "18446744073709551615"],
            vec!["more than 2^64 bytes"],
        ),
    ] {
        let out = pixel(d, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        for e in expected {
            assert!(text(&out).contains(e), "{args:?}: {e:?} in {}", text(&out));
        }
    }
    assert!(
        !d.join(run).join("samples/draws").exists(),
        "nothing written"
    );
    // An environment override would change the recorded run without a record: refused.
    let info = d.join(run).join("run.json");
    let json = std::fs::read_to_string(&info).unwrap();
    std::fs::write(&info, json.replace("\"completed\"", "\"interrupted\"")).unwrap();
    for args in [
        vec!["run", "--resume", run],
        vec!["sample", run],
        vec!["eval", run],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
            .args(&args)
            .current_dir(d)
            .env("PIXEL_TRAIN__EPOCHS", "2")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("PIXEL_TRAIN__EPOCHS=2"),
            "{}",
            text(&out)
        );
    }
    // Without it, the resume continues exactly the recorded experiment (one epoch, done).
    let out = pixel(d, &["run", "--resume", run]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        metrics_without_times(&d.join(run)).len(),
        2,
        "header and one epoch"
    );
}
