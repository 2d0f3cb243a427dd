//! A CUDA graph: the work libtorch queues on one device between [`CudaGraph::begin`] and
//! [`CudaGraph::end`], recorded once and launched again by [`CudaGraph::replay`] with one call
//! instead of a call per kernel (`at::cuda::CUDAGraph` in `src/native/torch_extras.cpp`, what
//! `torch.cuda.graph` runs; tch has no binding). A replay reads and writes the buffers the
//! capture did, at their addresses: whatever it should see new is written into them first, and
//! what it makes is read from the tensors the capture left.
//!
//! The work is captured, not run: a replay after [`CudaGraph::end`] runs it the first time.
//! Between begin and end nothing may wait for the device (a read of a tensor on the host, a copy
//! from the host's pageable memory): libtorch's call fails then, and the capture with it.

use std::ffi::{c_char, c_void};
use sys::*;

#[cfg(feature = "tch")]
mod sys {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn pixel_graph_available() -> i32;
        pub fn pixel_graph_new(device: i8, error: *mut c_char, error_len: usize) -> *mut c_void;
        pub fn pixel_graph_begin(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_graph_end(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_graph_enter(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_graph_leave(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_graph_replay(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn pixel_graph_free(graph: *mut c_void);
    }
}

/// Without libtorch: no graphs, and a graph asked for says why.
#[cfg(not(feature = "tch"))]
#[allow(clippy::missing_safety_doc)]
mod sys {
    use std::ffi::{c_char, c_void};
    pub unsafe fn pixel_graph_available() -> i32 {
        0
    }
    pub unsafe fn pixel_graph_new(_: i8, error: *mut c_char, len: usize) -> *mut c_void {
        let message = b"CUDA graphs are libtorch's: this build has no libtorch (--features tch)";
        let n = message.len().min(len - 1);
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr().cast(), error, n);
            *error.add(n) = 0;
        }
        std::ptr::null_mut()
    }
    pub unsafe fn pixel_graph_begin(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        unreachable!("no graph is made without libtorch")
    }
    pub unsafe fn pixel_graph_end(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        unreachable!("no graph is made without libtorch")
    }
    pub unsafe fn pixel_graph_replay(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        unreachable!("no graph is made without libtorch")
    }
    pub unsafe fn pixel_graph_enter(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        unreachable!("no graph is made without libtorch")
    }
    pub unsafe fn pixel_graph_leave(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        unreachable!("no graph is made without libtorch")
    }
    pub unsafe fn pixel_graph_free(_: *mut c_void) {}
}

/// The top-level libtorch operators `f` calls on this thread (and those libtorch's autograd
/// engine runs for it), one line each with their tensors' storages and their other arguments, and
/// the allocator's buffers made and freed (`src/native/torch_extras.cpp`; how the tests of
/// `replay` read them), and what `f` returns; or why there is no trace (a build without the
/// profiler). One trace at a time in the process: a second waits.
pub fn operator_trace<T>(f: impl FnOnce() -> T) -> (Result<Vec<String>, String>, T) {
    #[cfg(feature = "tch")]
    {
        use std::ffi::CStr;
        unsafe extern "C" {
            fn pixel_trace_start(error: *mut c_char, error_len: usize) -> i32;
            fn pixel_trace_stop() -> *mut c_char;
            fn pixel_trace_free(text: *mut c_char);
        }
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut error = [0 as c_char; 1024];
        // SAFETY: C functions of torch_extras.cpp that catch every exception; the text returned
        // is terminated, copied and freed by its own function.
        if unsafe { pixel_trace_start(error.as_mut_ptr(), error.len()) } != 0 {
            // SAFETY: terminated by the function.
            let message = unsafe { CStr::from_ptr(error.as_ptr()) };
            let message = format!("no operator trace: {}", message.to_string_lossy());
            return (Err(message), f());
        }
        let out = f();
        let text = unsafe { pixel_trace_stop() };
        if text.is_null() {
            return (Err("the operator trace was lost".into()), out);
        }
        let lines = unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .lines()
            .map(str::to_string)
            .collect();
        unsafe { pixel_trace_free(text) };
        (Ok(lines), out)
    }
    #[cfg(not(feature = "tch"))]
    (Err("no operator trace without libtorch".into()), f())
}

/// Whether libtorch sees a CUDA device.
pub fn cuda_available() -> bool {
    #[cfg(feature = "tch")]
    return tch::Cuda::is_available();
    #[cfg(not(feature = "tch"))]
    false
}

/// Whether this build captures CUDA graphs (`build.rs` found the CUDA runtime's headers for a
/// libtorch with CUDA, and the code compiled against them).
pub fn available() -> bool {
    // SAFETY: a C function of src/native/torch_extras.cpp without arguments.
    unsafe { pixel_graph_available() == 1 }
}

/// One graph on one CUDA device, freed on drop (a capture still under way is ended first).
#[derive(Debug)]
pub struct CudaGraph {
    graph: *mut c_void,
}

// A graph is used by one thread at a time (the training loop's); libtorch's CUDAGraph has no
// thread affinity.
unsafe impl Send for CudaGraph {}

/// Calls `f` with an error buffer and turns its -1 into the message written there.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
    let mut error = [0 as c_char; 2048];
    if f(error.as_mut_ptr(), error.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the C functions terminate the message they write.
    let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
    Err(format!("{what}: {}", message.to_string_lossy()))
}

impl CudaGraph {
    /// A graph to capture on CUDA device `index`.
    pub fn new(index: usize) -> Result<CudaGraph, String> {
        let device = i8::try_from(index).map_err(|_| format!("no CUDA device {index}"))?;
        let mut graph = std::ptr::null_mut();
        call("a CUDA graph could not be made", |error, len| {
            // SAFETY: writes a terminated message on failure and returns null then.
            graph = unsafe { pixel_graph_new(device, error, len) };
            if graph.is_null() { -1 } else { 0 }
        })?;
        Ok(CudaGraph { graph })
    }

    /// Waits for the device and makes the graph's stream current: what this thread queues runs
    /// there, eagerly, until [`Self::leave`] (the steps before a capture, so that what libraries
    /// set up for a stream the first time is set up outside it).
    pub fn enter(&mut self) -> Result<(), String> {
        // SAFETY: a live graph; the function catches every exception.
        call(
            "the CUDA graph's stream could not be made current",
            |e, n| unsafe { pixel_graph_enter(self.graph, e, n) },
        )
    }

    /// Waits for the device and makes the stream before [`Self::enter`] current again.
    pub fn leave(&mut self) -> Result<(), String> {
        // SAFETY: as above.
        call(
            "the device failed after a step on the CUDA graph's stream",
            |e, n| unsafe { pixel_graph_leave(self.graph, e, n) },
        )
    }

    /// Waits for the device, then captures what this thread queues on it until [`Self::end`]
    /// (on the graph's stream).
    pub fn begin(&mut self) -> Result<(), String> {
        // SAFETY: a live graph; the function catches every exception.
        call("the CUDA graph's capture could not begin", |e, n| unsafe {
            pixel_graph_begin(self.graph, e, n)
        })
    }

    /// Ends the capture: the graph is ready to replay.
    pub fn end(&mut self) -> Result<(), String> {
        // SAFETY: as above.
        call("the CUDA graph's capture failed", |e, n| unsafe {
            pixel_graph_end(self.graph, e, n)
        })
    }

    /// Queues the captured work on the device's current stream.
    pub fn replay(&mut self) -> Result<(), String> {
        // SAFETY: as above.
        call("the CUDA graph's replay failed", |e, n| unsafe {
            pixel_graph_replay(self.graph, e, n)
        })
    }
}

impl CudaGraph {
    /// A graph that holds nothing, never to begin or replay: for tests of what holds graphs.
    #[cfg(test)]
    pub fn detached() -> CudaGraph {
        CudaGraph {
            graph: std::ptr::null_mut(),
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.graph.is_null() {
            return;
        }
        // SAFETY: the graph was made by pixel_graph_new and is freed once; the function ends a
        // capture under way and catches every exception.
        unsafe { pixel_graph_free(self.graph) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the CUDA headers were installed for the build (CI runs bench/cuda-headers.sh and
    /// sets PIXEL_EXPECT_CUDA_GRAPHS=1), the graphs compiled in: a build that silently lost them
    /// fails here.
    #[test]
    fn the_build_has_cuda_graphs_where_expected() {
        if std::env::var_os("PIXEL_EXPECT_CUDA_GRAPHS").is_some() {
            assert!(
                available(),
                "PIXEL_EXPECT_CUDA_GRAPHS is set and this build has no CUDA graphs (see the \
                 build's warning)"
            );
        }
    }

    /// Without a CUDA device a graph cannot be made, and says why, in a build with graphs as in
    /// one without.
    #[test]
    fn a_graph_without_a_gpu_is_refused_with_a_reason() {
        if cuda_available() {
            return;
        }
        let error = CudaGraph::new(0).expect_err("no CUDA device here");
        assert!(
            error.starts_with("a CUDA graph could not be made: "),
            "{error}"
        );
        assert!(
            error.len() > "a CUDA graph could not be made: ".len() + 10,
            "{error}"
        );
    }
}
