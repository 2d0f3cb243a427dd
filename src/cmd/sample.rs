//! `pixel sample`: a grid from a finished (or interrupted) run's checkpoint, or N single images
//! (PNGs and optionally one `.npy` array) for FID and other tools.

use crate::cluster::World;
use crate::error::{Error, Result};
use crate::experiment::{self, Conditional};
use crate::progress::Progress;
use crate::results::{self, SAMPLES_DIR};
use crate::rng::{self, Purpose};
use crate::run;
use crate::sample::{self, Method};
use crate::session::{self, Session, Weights};
use burn::module::Module;
use std::path::{Path, PathBuf};

/// `pixel sample --count N`: single images instead of a grid.
#[derive(Clone, Copy, Debug)]
pub struct Draws {
    pub count: usize,
    /// Class-conditional models: the class of every image (default: image i gets class i mod 10).
    pub class: Option<u8>,
    /// Also write `samples.npy`, `[count, colours, height, width]` uint8.
    pub npy: bool,
    /// Images sampled at once.
    pub batch_size: usize,
}

/// The classes a conditional model is asked for (10: MNIST digits, CIFAR-10 classes).
const CLASSES: u8 = 10;

/// Writes a grid sampled from the run in `dir` to `out` (default `dir/samples/sample.png`), or
/// with `draws` that many single images into the folder `out` (default `dir/samples/draws/`),
/// with the experiment's temperature and seed unless given.
pub fn sample_results(
    dir: &Path,
    out: Option<PathBuf>,
    temperature: Option<f64>,
    seed: Option<u64>,
    draws: Option<Draws>,
) -> Result<()> {
    if let Some(d) = draws {
        check_draws(&d)?;
    }
    // Each flag is named as the source of its value in the plan's errors.
    let flag = |key: &str, value: String, origin: &str| experiment::Override {
        key: key.into(),
        value,
        origin: origin.into(),
    };
    let mut sets = Vec::new();
    if let Some(t) = temperature {
        sets.push(flag(
            "sample.temperature",
            toml::Value::Float(t).to_string(),
            "--temperature",
        ));
    }
    if let Some(s) = seed {
        sets.push(flag("train.seed", s.to_string(), "--seed"));
    }
    let plan = session::recorded_plan(dir, &sets, "pixel sample")?;
    if let Some(Draws { class: Some(k), .. }) = draws
        && plan.experiment.model.conditional != Conditional::Class
    {
        return Err(Error::Usage {
            flag: format!("--class {k}"),
            message: format!(
                "{} is not class-conditional (model.conditional = \"none\"): it draws no class",
                dir.display()
            ),
        });
    }
    let session = Session::open(plan, Weights::Trained(dir), &World::single())?;
    if let Some(d) = draws {
        let out = out.unwrap_or_else(|| dir.join(SAMPLES_DIR).join("draws"));
        return write_draws(&session, &d, &out);
    }
    let out = out.unwrap_or_else(|| dir.join(SAMPLES_DIR).join("sample.png"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    let Session {
        plan,
        splits,
        state,
        device,
        ..
    } = &session;
    run::write_grid(
        plan,
        state.eval_model(),
        &splits.test,
        0,
        &out,
        &device.device,
        &|| false,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

fn check_draws(d: &Draws) -> Result<()> {
    let usage = |flag: String, message: &str| {
        Err(Error::Usage {
            flag,
            message: message.into(),
        })
    };
    if d.count == 0 {
        return usage("--count 0".into(), "expected at least 1 image");
    }
    if d.batch_size == 0 {
        return usage(
            "--batch-size 0".into(),
            "expected at least 1 image per batch",
        );
    }
    if let Some(k) = d.class.filter(|&k| k >= CLASSES) {
        return usage(format!("--class {k}"), "expected a class from 0 to 9");
    }
    Ok(())
}

/// Bytes a PNG of `dims` random sub-pixels takes at most, beyond them: signature, header, end
/// and zlib's framing of stored blocks, with room to spare.
const PNG_OVERHEAD: u64 = 256;

/// Refuses a count whose files cannot fit on the disk holding `out` (the PNGs, and the array
/// with `--npy`), before anything is sampled or written.
fn check_room(d: &Draws, dims: usize, out: &Path) -> Result<()> {
    let dims = dims as u64;
    let count = d.count as u64;
    let per_image = dims + PNG_OVERHEAD + if d.npy { dims } else { 0 };
    let needed = count.checked_mul(per_image);
    let free = crate::atomic::free_bytes(out);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match (needed, free) {
        (Some(n), Some(f)) if n <= f => Ok(()),
        (Some(_), None) => Ok(()),
        (needed, free) => Err(Error::Usage {
            flag: format!("--count {}", d.count),
            message: format!(
                "{} images of {dims} sub-pixels need about {} GiB in {}{}, which has {} GiB free; \
                 ask for fewer or write elsewhere (--out)",
                d.count,
                needed.map_or_else(
                    || "more than 2^64 bytes".into(),
                    |n| format!("{:.1}", gib(n))
                ),
                out.display(),
                if d.npy { " (PNGs and samples.npy)" } else { "" },
                free.map_or_else(|| "?".into(), |f| format!("{:.1}", gib(f))),
            ),
        }),
    }
}

/// Samples `d.count` images in batches, writing `sample-NNNNN.png` each (whole or not at all) and
/// at the end `samples.npy`. Batch b draws from the sampling stream of (seed, b): the same seed
/// and batch size give the same images.
fn write_draws(session: &Session, d: &Draws, out: &Path) -> Result<()> {
    let test = &session.splits.test;
    let shape = (test.colours, test.height, test.width);
    check_room(d, shape.0 * shape.1 * shape.2, out)?;
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let model = session.state.eval_model().valid();
    let device = session.device.device.clone();
    let s = &session.plan.experiment;
    let bar = Progress::new("sampling", d.count as u64, "images");
    let started = std::time::Instant::now();
    // The array is streamed to its file batch by batch: memory does not grow with the count.
    let npy_path = out.join("samples.npy");
    let mut npy = match d.npy {
        true => {
            let mut file =
                crate::atomic::Pending::create(&npy_path).map_err(Error::io(&npy_path))?;
            let header = results::npy::header(&[d.count, shape.0, shape.1, shape.2]);
            file.write_all(&header).map_err(Error::io(&npy_path))?;
            Some(file)
        }
        false => None,
    };
    for b in 0..d.count.div_ceil(d.batch_size) {
        let batch = b * d.batch_size..((b + 1) * d.batch_size).min(d.count);
        let labels: Vec<u8> = batch
            .clone()
            .map(|i| d.class.unwrap_or((i % usize::from(CLASSES)) as u8))
            .collect();
        let mut rng = rng::stream(s.train.seed, Purpose::Draws, 0, b as u64);
        let pixels = sample::from_scratch(
            &model,
            &labels,
            shape,
            (Method::Cached, s.sample.temperature),
            &mut rng,
            &device,
            (&Progress::hidden(), &|| false),
        )
        .expect("never asked to stop");
        let dims = shape.0 * shape.1 * shape.2;
        for (i, image) in batch.clone().zip(pixels.chunks(dims)) {
            let path = out.join(format!("sample-{i:05}.png"));
            results::png::write_rgb_or_grey(&path, image, shape.0, shape.1, shape.2)
                .map_err(Error::io(&path))?;
        }
        if let Some(file) = npy.as_mut() {
            file.write_all(&pixels).map_err(Error::io(&npy_path))?;
        }
        bar.advance(batch.len() as u64);
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(file) = npy {
        file.finish().map_err(Error::io(&npy_path))?;
    }
    println!(
        "wrote {} images into {} ({:.1} images/s){}",
        d.count,
        out.display(),
        d.count as f64 / seconds.max(1e-9),
        if d.npy { ", and samples.npy" } else { "" }
    );
    Ok(())
}
