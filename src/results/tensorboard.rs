//! TensorBoard event files: `results/<name>/tensorboard/events.out.tfevents.*`, read by
//! `tensorboard --logdir results/`. The format is TFRecord (length, masked CRC-32C of it, data,
//! masked CRC-32C of the data) of `tensorflow.Event` protobuf messages; only the few fields written
//! here are encoded, by hand (field numbers from tensorflow/core/util/event.proto and
//! tensorflow/core/framework/summary.proto).

use super::MetricsRow;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Protobuf encoding of the messages written here.
mod proto {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// `Event { wall_time = 1, step = 2, file_version = 3, summary = 5, session_log = 6 }`.
fn event(step: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut out = Vec::new();
    proto::double(&mut out, 1, wall);
    proto::uint(&mut out, 2, step);
    body(&mut out);
    out
}

/// `Summary { value = 1 }` holding one `Value { tag = 1, ... }`, as field 5 of an event.
fn summary(out: &mut Vec<u8>, tag: &str, value: impl FnOnce(&mut Vec<u8>)) {
    let mut v = Vec::new();
    proto::bytes(&mut v, 1, tag.as_bytes());
    value(&mut v);
    let mut s = Vec::new();
    proto::bytes(&mut s, 1, &v);
    proto::bytes(out, 5, &s);
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs is not zero.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file. Each session of a run (the first, each resume) writes its own; TensorBoard
/// reads them in order.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), headed by the file version.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{}.{:09}.pixel.{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut writer = EventWriter { path, file };
        writer.write(&event(0, |out| proto::bytes(out, 3, b"brain.Event:2")))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&record(event))
    }

    /// A scalar: `Value.simple_value = 2`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        self.write(&event(step, |out| {
            summary(out, tag, |v| proto::float(v, 2, value as f32))
        }))
    }

    /// A PNG: `Value.image = 4`, `Image { height = 1, width = 2, colorspace = 3, encoded = 4 }`.
    pub fn png(
        &mut self,
        tag: &str,
        step: u64,
        png: &[u8],
        (height, width, colours): (u32, u32, u32),
    ) -> std::io::Result<()> {
        let mut image = Vec::new();
        proto::uint(&mut image, 1, u64::from(height));
        proto::uint(&mut image, 2, u64::from(width));
        proto::uint(&mut image, 3, u64::from(colours));
        proto::bytes(&mut image, 4, png);
        self.write(&event(step, |out| {
            summary(out, tag, |v| proto::bytes(v, 4, &image))
        }))
    }

    /// Text for TensorBoard's text plugin: `Value.metadata = 9` naming the plugin, and
    /// `Value.tensor = 8`, a `TensorProto { dtype = 1 (DT_STRING = 7), tensor_shape = 2 (one dim
    /// of size 1), string_val = 8 }`.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        let mut plugin = Vec::new();
        proto::bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        proto::bytes(&mut metadata, 1, &plugin);
        let mut dim = Vec::new();
        proto::uint(&mut dim, 1, 1);
        let mut shape = Vec::new();
        proto::bytes(&mut shape, 2, &dim);
        let mut tensor = Vec::new();
        proto::uint(&mut tensor, 1, 7);
        proto::bytes(&mut tensor, 2, &shape);
        proto::bytes(&mut tensor, 8, text.as_bytes());
        self.write(&event(step, |out| {
            summary(out, tag, |v| {
                proto::bytes(v, 9, &metadata);
                proto::bytes(v, 8, &tensor);
            })
        }))
    }

    /// `SessionLog { status = 1: START }` at `step`: TensorBoard drops what earlier files recorded
    /// at `step` and later, so a resumed run continues its curves without duplicate steps.
    pub fn restart_at(&mut self, step: u64) -> std::io::Result<()> {
        let mut log = Vec::new();
        proto::uint(&mut log, 1, 1);
        self.write(&event(step, |out| proto::bytes(out, 6, &log)))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A run's TensorBoard log: steps are global optimisation steps, so that per-step and per-epoch
/// curves share one axis and a resumed run's restart marker applies to both.
pub struct Board {
    writer: EventWriter,
    steps_per_epoch: u64,
    /// The first write that failed inside a step's report (reported at the epoch's end).
    failed: Option<std::io::Error>,
    last_step: Option<(u64, std::time::Instant, usize)>,
}

impl Board {
    /// Opens a new event file under `run_dir/tensorboard/`. A fresh run records `experiment`
    /// (the resolved TOML) as text; a resumed one, `steps_done` global steps in, marks the restart.
    pub fn open(
        run_dir: &Path,
        steps_per_epoch: usize,
        steps_done: u64,
        experiment: &str,
    ) -> Result<Board> {
        let dir = run_dir.join(super::TENSORBOARD_DIR);
        let fail = |e| Error::Io {
            path: dir.clone(),
            error: e,
        };
        let mut writer = EventWriter::create(&dir).map_err(fail)?;
        if steps_done == 0 {
            // Markdown: indent four spaces for a code block.
            let text: String = experiment.lines().map(|l| format!("    {l}\n")).collect();
            writer.text("experiment", 0, &text).map_err(fail)?;
        } else {
            writer.restart_at(steps_done + 1).map_err(fail)?;
        }
        writer.flush().map_err(fail)?;
        Ok(Board {
            writer,
            steps_per_epoch: steps_per_epoch as u64,
            failed: None,
            last_step: None,
        })
    }

    /// The global step of step `step` (from 1) of `epoch` (from 1).
    pub fn global_step(&self, epoch: usize, step: usize) -> u64 {
        (epoch as u64 - 1) * self.steps_per_epoch + step as u64
    }

    /// Per-step scalars: the batch's bits/dim, the learning rate, the gradients' L2 norm, images
    /// per second since the last step, and for f16 the loss scale.
    pub fn step(&mut self, epoch: usize, report: &crate::train::StepReport) {
        let at = self.global_step(epoch, report.step);
        let now = std::time::Instant::now();
        let mut scalars = vec![
            ("train/batch_bits_per_dim", report.bits_per_dim),
            ("train/learning_rate", report.learning_rate),
        ];
        if let Some((_, then, images)) = self.last_step.filter(|(s, ..)| s + 1 == at) {
            let seconds = now.duration_since(then).as_secs_f64().max(1e-9);
            scalars.push((
                "train/images_per_second",
                (report.images_done.saturating_sub(images)) as f64 / seconds,
            ));
        }
        if let Some(scale) = report.loss_scale {
            scalars.push(("train/loss_scale", scale));
        }
        if report.gradient_norm.is_finite() {
            scalars.push(("train/gradient_norm", report.gradient_norm));
        }
        self.last_step = Some((at, now, report.images_done));
        for (tag, value) in scalars {
            if let Err(e) = self.writer.scalar(tag, at, value)
                && self.failed.is_none()
            {
                self.failed = Some(e);
            }
        }
    }

    /// The epoch's row of metrics.csv, at the epoch's last global step, then a flush.
    pub fn epoch(&mut self, row: &MetricsRow) -> Result<()> {
        let at = self.global_step(row.epoch + 1, 0);
        let optional = [
            ("epoch/validation_bits_per_dim", row.validation_bits_per_dim),
            (
                "epoch/train_recon_bits_per_dim",
                row.train_recon_bits_per_dim,
            ),
            ("epoch/train_kl_bits_per_dim", row.train_kl_bits_per_dim),
            ("epoch/test_recon_bits_per_dim", row.test_recon_bits_per_dim),
            ("epoch/test_kl_bits_per_dim", row.test_kl_bits_per_dim),
            ("epoch/kl_weight", row.kl_weight),
            ("epoch/learning_rate", row.learning_rate),
            ("epoch/gradient_norm", row.gradient_norm),
            ("epoch/skipped_steps", row.skipped_steps.map(|n| n as f64)),
        ];
        let scalars = [
            ("epoch/train_bits_per_dim", Some(row.train_bits_per_dim)),
            ("epoch/test_bits_per_dim", Some(row.test_bits_per_dim)),
            (
                "epoch/train_images_per_second",
                Some(row.train_images_per_second),
            ),
            ("epoch/epoch", Some(row.epoch as f64)),
        ];
        let path = self.writer.path().to_path_buf();
        let fail = |error| Error::Io {
            path: path.clone(),
            error,
        };
        if let Some(e) = self.failed.take() {
            return Err(fail(e));
        }
        for (tag, value) in scalars.into_iter().chain(optional) {
            if let Some(v) = value {
                self.writer.scalar(tag, at, v).map_err(fail)?;
            }
        }
        self.writer.flush().map_err(fail)
    }

    /// The PNG at `png` (a sample grid) as image `tag` at the end of `epoch`.
    pub fn image(&mut self, tag: &str, epoch: usize, png: &Path) -> Result<()> {
        let bytes = std::fs::read(png).map_err(Error::io(png))?;
        // IHDR: width and height (big-endian) at bytes 16..24, colour type at 25.
        let size = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let colours = if bytes[25] == 0 { 1 } else { 3 };
        let at = self.global_step(epoch + 1, 0);
        let path = self.writer.path().to_path_buf();
        self.writer
            .png(tag, at, &bytes, (size(20), size(16), colours))
            .and_then(|()| self.writer.flush())
            .map_err(Error::io(path))
    }

    /// Writes what is buffered (on an interrupt).
    pub fn flush(&mut self) -> Result<()> {
        let path = self.writer.path().to_path_buf();
        self.writer.flush().map_err(Error::io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C of "123456789" is 0xE3069283 (the check value of the Castagnoli polynomial), and
    /// a record frames its data with the length and both masked checksums.
    #[test]
    fn records_frame_data_with_masked_crc32c() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
        let mut v = Vec::new();
        proto::varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
