//! Choosing and configuring the Burn device, and the backend and precision kinds the format names.
//! The only module with backend `cfg(feature)`s; imports only `rng`.

use burn::tensor::Device;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Burn backends.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-flex: pure Rust, CPU.
    Flex,
    /// burn-tch: libtorch, CPU or CUDA.
    Libtorch,
    /// The fastest compiled in: libtorch on CUDA when a GPU is visible, libtorch CPU when
    /// libtorch is compiled in, else flex. `run.json` records the choice and why.
    Auto,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Libtorch => "libtorch",
            BackendKind::Auto => "auto",
        }
    }
}

/// Float precisions of the convolutions. Weights, optimizer state, softmax and loss stay f32.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// Convolutions in bf16 (f32's range: no loss scaling needed).
    Bf16,
    /// Convolutions in f16, with dynamic loss scaling against gradient underflow and overflow.
    F16,
}

/// What the experiment asked for, checked before any tensor exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceChoice {
    pub backend: BackendKind,
    pub target: Target,
    pub precision: Precision,
    /// libtorch's deterministic algorithms (`runtime.deterministic`); the CPU backends are
    /// deterministic either way.
    pub deterministic: bool,
    /// cuDNN's benchmarking (`runtime.cudnn_benchmark`; never with `deterministic`).
    pub cudnn_benchmark: bool,
}

/// Where the tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Auto,
    Cpu,
    Cuda(usize),
}

impl Target {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(text: &str) -> Option<Target> {
        match text {
            "auto" => Some(Target::Auto),
            "cpu" => Some(Target::Cpu),
            "cuda" => Some(Target::Cuda(0)),
            _ => text.strip_prefix("cuda:")?.parse().ok().map(Target::Cuda),
        }
    }
}

/// Whether a backend was compiled into this binary.
pub fn compiled_in(backend: BackendKind) -> bool {
    match backend {
        BackendKind::Flex | BackendKind::Auto => true,
        BackendKind::Libtorch => cfg!(feature = "tch"),
    }
}

/// The backend and target that `choice` runs on, and why, given whether libtorch is compiled in
/// and whether it sees a CUDA device (asked only where it matters).
pub fn resolve(
    choice: &DeviceChoice,
    libtorch: bool,
    cuda: impl FnOnce() -> bool,
) -> (BackendKind, Target, String) {
    let asked = format!("runtime.backend = \"{}\"", choice.backend.name());
    match (choice.backend, choice.target) {
        (BackendKind::Auto, Target::Cuda(i)) => (
            BackendKind::Libtorch,
            Target::Cuda(i),
            "backend auto: libtorch, as runtime.device asks for CUDA".into(),
        ),
        (BackendKind::Auto, _) if !libtorch => (
            BackendKind::Flex,
            Target::Cpu,
            "backend auto: flex, the only backend compiled into this binary".into(),
        ),
        (BackendKind::Auto, Target::Auto) if cuda() => (
            BackendKind::Libtorch,
            Target::Cuda(0),
            "backend auto: libtorch on CUDA, compiled in and a GPU is visible".into(),
        ),
        (BackendKind::Auto, _) => (
            BackendKind::Libtorch,
            Target::Cpu,
            "backend auto: libtorch on the CPU, compiled in (faster than flex there) and no GPU \
             asked for or visible"
                .into(),
        ),
        (backend, target) => (backend, target, asked),
    }
}

/// How to get a backend that is not compiled in.
pub fn rebuild_hint(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Flex | BackendKind::Auto => "",
        BackendKind::Libtorch => {
            "a binary built with libtorch: `cargo build --release --features tch` \
             (see docs/backends.md)"
        }
    }
}

/// An opened device: the handle plus a printable description for `run.json`.
#[derive(Clone, Debug)]
pub struct Opened {
    pub device: Device,
    pub description: String,
    /// The GPU's name, for a CUDA device (from `nvidia-smi`, when it answers).
    pub gpu: Option<String>,
    /// The backend it runs on (`auto` resolved), and why.
    pub backend: BackendKind,
    pub reason: String,
    /// The backend's threads, where they were set (ranks sharing a node).
    pub threads: Option<usize>,
}

/// Where in a job of several ranks this process runs: which GPU of the node an automatic choice
/// takes, and how many threads the backend may use (None: its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Place {
    pub local_rank: usize,
    pub threads: Option<usize>,
}

/// Opens the device (after the plan has checked the backend is compiled in). A device chosen
/// automatically on a node with GPUs is `cuda:<local rank modulo the GPUs visible>`: one GPU per
/// rank when a node runs as many ranks as it has GPUs (or each rank sees only its own).
/// A CUDA device that libtorch does not see (none at all, or an index past the last) is an error
/// naming `runtime.device`, before libtorch is asked for it (it would abort inside libtorch).
pub fn open(choice: &DeviceChoice, seed: u64, place: Place) -> Result<Opened, String> {
    let (backend, target, reason) = resolve(choice, cfg!(feature = "tch"), cuda_available);
    let target = match (choice.target, target) {
        (Target::Auto, Target::Cuda(_)) => Target::Cuda(place.local_rank % cuda_devices().max(1)),
        (Target::Auto, Target::Auto) if backend == BackendKind::Libtorch && cuda_available() => {
            Target::Cuda(place.local_rank % cuda_devices().max(1))
        }
        _ => target,
    };
    if let (BackendKind::Libtorch, Target::Cuda(i)) = (backend, target) {
        let visible = cuda_devices();
        if i >= visible {
            return Err(missing_cuda(i, visible));
        }
    }
    let (device, description) = match backend {
        BackendKind::Libtorch => libtorch(target, place.threads, choice)?,
        _ => {
            if let Some(n) = place.threads {
                // The global pool flex computes on; only the first configuration takes effect.
                let _ = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global();
            }
            (Device::flex(), "flex:cpu".to_string())
        }
    };
    device.seed(crate::rng::derive(seed, crate::rng::Purpose::Backend, 0, 0));
    if choice.cudnn_benchmark && cuda_index(&description).is_none() {
        // device "auto" on a machine without a GPU: the switch is set and has nothing to time.
        tracing::warn!(
            "runtime.cudnn_benchmark = true does nothing here: the run is on {description}"
        );
    }
    let gpu = cuda_index(&description).and_then(gpu_name);
    Ok(Opened {
        device,
        description,
        gpu,
        backend,
        reason,
        threads: place.threads,
    })
}

/// The CUDA device an opened device's description names, if it is one.
fn cuda_index(description: &str) -> Option<usize> {
    description.strip_prefix("libtorch:cuda:")?.parse().ok()
}

impl Opened {
    /// The most bytes libtorch's CUDA allocator has held in tensors on this GPU since the process
    /// started or [`Opened::reset_gpu_peak`] (what `torch.cuda.max_memory_allocated` reads); None
    /// off CUDA.
    pub fn gpu_peak_bytes(&self) -> Option<u64> {
        let index = i8::try_from(cuda_index(&self.description)?).ok()?;
        #[cfg(feature = "tch")]
        {
            // SAFETY: a plain C function of src/native/torch_extras.cpp; it catches every C++
            // exception and answers -1 where there is no CUDA allocator.
            let bytes = unsafe { native::pixel_cuda_peak_allocated(index) };
            u64::try_from(bytes).ok()
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = index;
            None
        }
    }

    /// Starts a new peak for [`Opened::gpu_peak_bytes`] at what is held now (as
    /// `torch.cuda.reset_peak_memory_stats`); nothing off CUDA.
    pub fn reset_gpu_peak(&self) {
        #[cfg(feature = "tch")]
        if let Some(index) = cuda_index(&self.description).and_then(|i| i8::try_from(i).ok()) {
            // SAFETY: as above.
            unsafe { native::pixel_cuda_reset_peak(index) };
        }
    }

    /// Starts libtorch's profiler (what `torch.profiler` runs): the operators this thread and
    /// the autograd engine call, and on CUDA the GPU's kernels and copies, until
    /// [`Profiler::save`]. Only libtorch has one.
    pub fn start_profiler(&self) -> Result<Profiler, String> {
        if self.backend != BackendKind::Libtorch {
            return Err(format!(
                "{} has no profiler; expected runtime.backend = \"libtorch\" (libtorch's, as \
                 torch.profiler runs)",
                self.description
            ));
        }
        #[cfg(feature = "tch")]
        {
            let cuda = cuda_index(&self.description).is_some();
            let mut error = [0u8; 1024];
            // SAFETY: a plain C function of src/native/torch_extras.cpp that catches every
            // exception and writes a terminated message of at most `error.len()` bytes.
            let status = unsafe {
                native::pixel_profiler_start(cuda, error.as_mut_ptr().cast(), error.len())
            };
            match status {
                0 => Ok(Profiler { running: true }),
                _ => Err(format!(
                    "libtorch's profiler did not start: {}",
                    text(&error)
                )),
            }
        }
        #[cfg(not(feature = "tch"))]
        unreachable!("the plan rejects the libtorch backend when it is not compiled in")
    }
}

/// libtorch's profiler while it runs; dropped without [`Profiler::save`], it stops and keeps
/// nothing.
pub struct Profiler {
    running: bool,
}

/// A named range of a profile (a user annotation in the trace), from [`Profiler::range`] until
/// dropped.
pub struct Range(#[cfg_attr(not(feature = "tch"), allow(dead_code))] *mut std::ffi::c_void);

impl Profiler {
    /// Marks what runs until the returned range is dropped as `name` in the trace (as
    /// `torch.profiler.record_function`).
    pub fn range(&self, name: &str) -> Range {
        #[cfg(feature = "tch")]
        {
            let name = std::ffi::CString::new(name).expect("a range's name has no NUL");
            // SAFETY: a plain C function that catches every exception; null where no profiler
            // records (then `pixel_range_end` does nothing).
            Range(unsafe { native::pixel_range_begin(name.as_ptr()) })
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = name;
            Range(std::ptr::null_mut())
        }
    }

    /// Stops the profiler and writes what it saw to `path`, a Chrome trace (JSON; Perfetto,
    /// chrome://tracing and `bench/profile_summary.py` read it).
    pub fn save(mut self, path: &std::path::Path) -> Result<(), String> {
        self.running = false;
        stop(Some(path))
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            let _ = stop(None);
        }
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        #[cfg(feature = "tch")]
        // SAFETY: the pointer pixel_range_begin gave, ended once.
        unsafe {
            native::pixel_range_end(self.0)
        };
    }
}

/// Stops libtorch's profiler, saving its trace at `path` (or at /dev/null: nowhere).
fn stop(path: Option<&std::path::Path>) -> Result<(), String> {
    #[cfg(feature = "tch")]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = path.unwrap_or(std::path::Path::new("/dev/null"));
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{} has a NUL byte", path.display()))?;
        let mut error = [0u8; 1024];
        // SAFETY: as in `start_profiler`.
        let status = unsafe {
            native::pixel_profiler_stop(c_path.as_ptr(), error.as_mut_ptr().cast(), error.len())
        };
        match status {
            0 => Ok(()),
            _ => Err(format!(
                "libtorch's profiler did not save {}: {}",
                path.display(),
                text(&error)
            )),
        }
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = path;
        Ok(())
    }
}

/// A C message written into `buffer`, up to its first NUL.
#[cfg(feature = "tch")]
fn text(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// What tch does not expose of libtorch (src/native/torch_extras.cpp, compiled by build.rs).
#[cfg(feature = "tch")]
mod native {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn pixel_cuda_peak_allocated(device: i8) -> i64;
        pub fn pixel_cuda_reset_peak(device: i8) -> i32;
        pub fn pixel_set_algorithms(deterministic: bool, benchmark: bool) -> i32;
        pub fn pixel_profiler_start(cuda: bool, error: *mut c_char, error_len: usize) -> i32;
        pub fn pixel_profiler_stop(path: *const c_char, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_range_begin(name: *const c_char) -> *mut c_void;
        pub fn pixel_range_end(range: *mut c_void);
    }
}

/// What a user is told when CUDA device `index` is asked for and libtorch sees `visible`.
fn missing_cuda(index: usize, visible: usize) -> String {
    let env = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"))
        .unwrap_or_default();
    match visible {
        0 => format!(
            "no cuda:{index} here: libtorch sees no CUDA device{env} (no GPU, no driver, or a \
             libtorch built without CUDA); expected \"cpu\" or \"auto\" on this machine"
        ),
        n => format!(
            "no cuda:{index} here: libtorch sees {n} CUDA device{}{env}; expected cuda:0 to cuda:{}",
            if n == 1 { "" } else { "s" },
            n - 1
        ),
    }
}

/// This machine's memory in bytes (`MemTotal` of /proc/meminfo), where the system says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The name of GPU `index` as `nvidia-smi` reports it, if it is there and answers.
fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .arg(format!("--id={index}"))
        .output()
        .ok()?;
    let name = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// The cuBLAS workspace setting under which its matrix products are deterministic (NVIDIA's
/// cuBLAS documentation, "Results reproducibility"); libtorch refuses them in deterministic mode
/// without it.
pub const CUBLAS_WORKSPACE: (&str, &str) = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8");

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream but is the fast path on CPU and CUDA here.
fn libtorch(
    target: Target,
    threads: Option<usize>,
    choice: &DeviceChoice,
) -> Result<(Device, String), String> {
    let (deterministic, benchmark) = (choice.deterministic, choice.cudnn_benchmark);
    if let Some(n) = threads {
        tch::set_num_threads(n as i32);
    }
    if deterministic && std::env::var_os(CUBLAS_WORKSPACE.0).is_none() {
        // SAFETY: set before libtorch creates its first cuBLAS handle (none exists before the
        // device is opened here), while no other thread of pixel reads the environment.
        unsafe { std::env::set_var(CUBLAS_WORKSPACE.0, CUBLAS_WORKSPACE.1) };
    }
    // SAFETY: a plain C function of src/native/torch_extras.cpp that catches every exception.
    let taken = unsafe { native::pixel_set_algorithms(deterministic, benchmark) };
    if taken != 1 {
        return Err(format!(
            "runtime.deterministic = {deterministic}, runtime.cudnn_benchmark = {benchmark}: \
             libtorch did not take these switches (answer {taken}); expected a libtorch with \
             at::Context's setDeterministicAlgorithms and setBenchmarkCuDNN"
        ));
    }
    Ok(match target {
        Target::Cpu | Target::Auto => (Device::libtorch(), "libtorch:cpu".into()),
        Target::Cuda(i) => (Device::libtorch_cuda(i), format!("libtorch:cuda:{i}")),
    })
}

#[cfg(not(feature = "tch"))]
fn libtorch(_: Target, _: Option<usize>, _: &DeviceChoice) -> Result<(Device, String), String> {
    unreachable!("the plan rejects the libtorch backend when it is not compiled in")
}

/// How many CUDA devices libtorch sees.
#[cfg(feature = "tch")]
fn cuda_devices() -> usize {
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

#[cfg(not(feature = "tch"))]
fn cuda_devices() -> usize {
    0
}

/// Whether libtorch can see a CUDA device.
#[cfg(feature = "tch")]
pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

#[cfg(not(feature = "tch"))]
pub fn cuda_available() -> bool {
    false
}

/// Every backend compiled into this build, on CPU: the tests run on each.
#[cfg(test)]
pub(crate) fn test_devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::flex()];
    #[cfg(feature = "tch")]
    #[allow(deprecated)]
    devices.push(Device::libtorch());
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An absent CUDA device is named with what is there instead.
    #[test]
    fn a_missing_cuda_device_says_what_is_there() {
        let none = missing_cuda(0, 0);
        assert!(none.contains("sees no CUDA device"), "{none}");
        let past = missing_cuda(3, 2);
        assert!(
            past.contains("sees 2 CUDA devices") && past.contains("cuda:0 to cuda:1"),
            "{past}"
        );
    }

    /// On a machine without a GPU (as CI's), asking libtorch for one is the error, not an abort.
    #[cfg(feature = "tch")]
    #[test]
    fn opening_an_absent_cuda_device_is_an_error() {
        let choice = DeviceChoice {
            backend: BackendKind::Libtorch,
            target: Target::Cuda(cuda_devices()),
            precision: Precision::F32,
            deterministic: false,
            cudnn_benchmark: false,
        };
        let Err(err) = open(&choice, 1, Place::default()) else {
            panic!("opened a CUDA device past the last one")
        };
        assert!(err.contains("libtorch sees"), "{err}");
    }

    /// The GPU peak is None off CUDA, and where no CUDA allocator answers (a machine without a
    /// GPU) the C++ side's exception is caught, not an abort.
    #[test]
    fn the_gpu_peak_is_none_off_cuda_and_without_a_gpu() {
        let opened = |description: &str| Opened {
            device: Device::flex(),
            description: description.into(),
            gpu: None,
            backend: BackendKind::Flex,
            reason: String::new(),
            threads: None,
        };
        assert_eq!(opened("flex:cpu").gpu_peak_bytes(), None);
        assert_eq!(opened("libtorch:cpu").gpu_peak_bytes(), None);
        if !cuda_available() {
            let absent = opened("libtorch:cuda:0");
            absent.reset_gpu_peak();
            assert_eq!(absent.gpu_peak_bytes(), None);
        }
    }

    #[test]
    fn auto_picks_libtorch_cuda_then_libtorch_cpu_then_flex() {
        let choice = |backend, target| DeviceChoice {
            backend,
            target,
            precision: Precision::F32,
            deterministic: false,
            cudnn_benchmark: false,
        };
        let auto = choice(BackendKind::Auto, Target::Auto);
        let pick = |c: &DeviceChoice, tch, cuda| {
            let (b, t, why) = resolve(c, tch, || cuda);
            assert!(
                why.contains("auto") || c.backend != BackendKind::Auto,
                "{why}"
            );
            (b, t)
        };
        assert_eq!(
            pick(&auto, true, true),
            (BackendKind::Libtorch, Target::Cuda(0))
        );
        assert_eq!(
            pick(&auto, true, false),
            (BackendKind::Libtorch, Target::Cpu)
        );
        assert_eq!(pick(&auto, false, true), (BackendKind::Flex, Target::Cpu));
        let cpu = choice(BackendKind::Auto, Target::Cpu);
        assert_eq!(pick(&cpu, true, true), (BackendKind::Libtorch, Target::Cpu));
        let cuda = choice(BackendKind::Auto, Target::Cuda(1));
        assert_eq!(
            pick(&cuda, true, false),
            (BackendKind::Libtorch, Target::Cuda(1))
        );
        // An explicit backend is taken as written.
        let flex = choice(BackendKind::Flex, Target::Auto);
        assert_eq!(pick(&flex, true, true), (BackendKind::Flex, Target::Auto));
    }

    #[test]
    fn parses_targets() {
        assert_eq!(Target::parse("auto"), Some(Target::Auto));
        assert_eq!(Target::parse("cpu"), Some(Target::Cpu));
        assert_eq!(Target::parse("cuda"), Some(Target::Cuda(0)));
        assert_eq!(Target::parse("cuda:3"), Some(Target::Cuda(3)));
        assert_eq!(Target::parse("cuda:x"), None);
        assert_eq!(Target::parse("gpu"), None);
    }
}
