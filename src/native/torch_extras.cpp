// What tch does not expose of libtorch, compiled by build.rs for libtorch builds against the
// headers of the libtorch it links (no CUDA headers needed):
// - the CUDA caching allocator's statistics, what torch.cuda.max_memory_allocated and
//   torch.cuda.reset_peak_memory_stats read and reset (c10's device-allocator interface, PyTorch
//   2.9 and later; where it does not compile, build.rs defines PIXEL_NO_ALLOCATOR_STATS: none);
// - the global switches of torch.use_deterministic_algorithms and torch.backends.cudnn;
// - a backward pass from a given output gradient (tch's starts from a scalar only);
// - libtorch's profiler (Kineto, what torch.profiler runs): operators on the host, kernels and
//   copies on the GPU, saved as a Chrome trace (where it does not compile, build.rs defines
//   PIXEL_NO_PROFILER: none);
// - a trace of the operators a stretch of code runs, with their tensors' storages and their
//   other arguments, to check on any device that a step could be replayed as a CUDA graph
//   (`src/model/native/replay.rs`; none without the profiler either);
// - a training step captured once as a CUDA graph and replayed (at::cuda::CUDAGraph, what
//   torch.cuda.graph runs; `src/model/native/graph.rs`). Needs the CUDA runtime's headers:
//   where build.rs finds none, or they do not compile, it defines PIXEL_NO_CUDA_GRAPH: none.
#include <ATen/Context.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>

#ifndef PIXEL_NO_ALLOCATOR_STATS
#include <c10/core/CachingDeviceAllocator.h>
#endif
#ifndef PIXEL_NO_PROFILER
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <c10/core/Allocator.h>
#include <algorithm>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <mutex>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>
#endif
#ifndef PIXEL_NO_CUDA_GRAPH
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#endif

extern "C" {

// Deterministic algorithms everywhere (an operation without one is an error, not a warning) and
// deterministic cuDNN algorithms, or libtorch's defaults; cuDNN's benchmarking on or off (never
// on with the first). Reads the switches back: 1 when all three are as asked, 0 when not, -1 on
// an exception.
int pixel_set_algorithms(bool deterministic, bool benchmark) {
  try {
    auto& context = at::globalContext();
    context.setDeterministicAlgorithms(deterministic, /*warn_only=*/false);
    context.setDeterministicCuDNN(deterministic);
    context.setBenchmarkCuDNN(benchmark && !deterministic);
    return context.deterministicAlgorithms() == deterministic &&
        context.deterministicCuDNN() == deterministic &&
        context.benchmarkCuDNN() == (benchmark && !deterministic);
  } catch (...) {
    return -1;
  }
}

// The vector-Jacobian product through libtorch's graph: the gradients of the `n` tensors `inputs`
// (each requiring a gradient) given `grad`, the gradient of `output`, as new tensors in `results`
// (undefined where the output does not depend on an input), the graph freed. 0 on success, else -1
// with the exception's message in `error` (`error_len` bytes, terminated).
int pixel_vjp(const at::Tensor* output, const at::Tensor* grad, const at::Tensor* const* inputs,
              int n, at::Tensor** results, char* error, size_t error_len) {
  try {
    torch::autograd::edge_list roots{torch::autograd::impl::gradient_edge(*output)};
    torch::autograd::edge_list edges;
    edges.reserve(n);
    for (int i = 0; i < n; ++i) {
      edges.push_back(torch::autograd::impl::gradient_edge(*inputs[i]));
    }
    torch::autograd::variable_list grads{*grad};
    auto out = torch::autograd::Engine::get_default_engine().execute(
        roots, grads, /*keep_graph=*/false, /*create_graph=*/false, /*accumulate_grad=*/false,
        edges);
    for (int i = 0; i < n; ++i) {
      results[i] = new at::Tensor(out[i]);
    }
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(error, e.what(), error_len - 1);
    error[error_len - 1] = 0;
    return -1;
  } catch (...) {
    std::strncpy(error, "an exception that is not a std::exception", error_len - 1);
    error[error_len - 1] = 0;
    return -1;
  }
}

#ifndef PIXEL_NO_ALLOCATOR_STATS

// Peak bytes held in tensors on CUDA device `device` since the process started or the last
// reset; -1 where libtorch has no CUDA allocator (no GPU, a CPU-only libtorch) or it fails.
int64_t pixel_cuda_peak_allocated(int8_t device) {
  try {
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(device);
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  } catch (...) {
    return -1;
  }
}

// Starts a new peak at the bytes held now; 0 on success, -1 as above.
int pixel_cuda_reset_peak(int8_t device) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(device);
    return 0;
  } catch (...) {
    return -1;
  }
}
#else
int64_t pixel_cuda_peak_allocated(int8_t) { return -1; }
int pixel_cuda_reset_peak(int8_t) { return -1; }
#endif

// Copies `e`'s message into `error` (`error_len` bytes, terminated).
static void message(const char* what, char* error, size_t error_len) {
  std::strncpy(error, what, error_len - 1);
  error[error_len - 1] = 0;
}

#ifndef PIXEL_NO_PROFILER

// Starts libtorch's profiler on the calling thread (and the autograd engine's threads it starts):
// operators on the host, and with `cuda` the GPU's kernels and copies. 0 on success, else -1 with
// the message in `error`.
int pixel_profiler_start(bool cuda, char* error, size_t error_len) {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) {
      activities.insert(ActivityType::CUDA);
    }
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    message(e.what(), error, error_len);
    return -1;
  }
}

// Stops the profiler started by pixel_profiler_start and saves what it saw as a Chrome trace
// (JSON) at `path`. 0 on success, else -1 with the message in `error`.
int pixel_profiler_stop(const char* path, char* error, size_t error_len) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
    return 0;
  } catch (const std::exception& e) {
    message(e.what(), error, error_len);
    return -1;
  }
}

// A named range of the trace (a user annotation, as torch.profiler.record_function): begun here,
// ended by pixel_range_end with what this returns (null where no profiler records it).
void* pixel_range_begin(const char* name) {
  try {
    auto* range = new at::RecordFunction(at::RecordScope::USER_SCOPE);
    if (!range->isActive()) {
      delete range;
      return nullptr;
    }
    range->before(name);
    return range;
  } catch (...) {
    return nullptr;
  }
}

void pixel_range_end(void* range) {
  if (range != nullptr) {
    auto* r = static_cast<at::RecordFunction*>(range);
    try {
      r->end();
    } catch (...) {
    }
    delete r;
  }
}

// The operator trace: one line per operator, `name.overload<TAB>inputs<TAB>outputs` (an
// operator that another calls with its depth first: `1 aten::mm`), each argument a token: a
// tensor as `T<storage address>@<offset>:<dtype>:<sizes>:<strides>` (`U` undefined; a number an
// operator wrapped into a tensor as `W<dtype>#<hash of its bytes>`), a list as `[ ... ]`, a float
// in hexadecimal, anything else as libtorch prints it. Data from the host: tch uploads by
// `aten::zeros` and a memcpy that no operator sees, so the first read of a CPU tensor that
// `aten::zeros` made in the trace and that is not all zeros appends `#up<hash of its bytes>`.
namespace {
std::mutex trace_mutex;
std::string* trace_text = nullptr;
std::unordered_set<const void*>* trace_fresh = nullptr;
at::CallbackHandle trace_handle = 0;
thread_local int trace_depth = 0;
// Whether this thread started the trace (marks come from it only).
thread_local bool trace_here = false;
// The lines of the operators under way on this thread, outermost first.
thread_local std::vector<std::string> trace_pending;

uint64_t fnv1a(const unsigned char* bytes, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h = (h ^ bytes[i]) * 1099511628211ull;
  }
  return h;
}

void trace_value(std::ostream& out, const c10::IValue& v, bool input) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) {
      out << " U";
      return;
    }
    const void* base = t.has_storage() ? t.storage().data() : nullptr;
    if (t.unsafeGetTensorImpl()->is_wrapped_number() && base != nullptr) {
      // A number that an operator wrapped to pass on (what a CUDA kernel takes as an argument):
      // its value, not its place.
      out << " W" << t.scalar_type() << "#" << std::hex
          << fnv1a(static_cast<const unsigned char*>(base), t.storage().nbytes()) << std::dec;
      return;
    }
    out << " T" << reinterpret_cast<uintptr_t>(base) << "@" << t.storage_offset() << ":"
        << t.scalar_type() << ":";
    for (auto d : t.sizes()) out << d << "x";
    out << ":";
    for (auto d : t.strides()) out << d << "x";
    if (input && base != nullptr && trace_fresh->erase(base) == 1 && t.device().is_cpu()) {
      const auto* bytes = static_cast<const unsigned char*>(base);
      size_t n = t.storage().nbytes();
      if (std::any_of(bytes, bytes + n, [](unsigned char b) { return b != 0; })) {
        out << "#up" << std::hex << fnv1a(bytes, n) << std::dec;
      }
    }
  } else if (v.isList()) {
    out << " [";
    for (const auto& e : v.toListRef()) trace_value(out, e, input);
    out << " ]";
  } else if (v.isDouble()) {
    out << " " << std::hexfloat << v.toDouble() << std::defaultfloat;
  } else if (v.isNone()) {
    out << " None";
  } else {
    std::ostringstream s;
    s << v;
    std::string text = s.str();
    for (auto& c : text) {
      if (c == ' ' || c == '\t' || c == '\n') c = '_';
    }
    out << " " << text;
  }
}

// Ranges that are not operators (the autograd engine's `evaluate_function`) are looked
// through. An operator called by another is written with its depth before its name (`1 aten::mm`):
// a buffer it makes is made inside the trace, though its caller does not return it.
std::unique_ptr<at::ObserverContext> trace_enter(const at::RecordFunction& fn) {
  if (!fn.operator_name()) {
    return nullptr;
  }
  std::ostringstream line;
  if (trace_depth > 0) {
    line << trace_depth << " ";
  }
  ++trace_depth;
  line << fn.name();
  if (auto op = fn.operator_name(); op && !op->overload_name.empty()) {
    line << "." << op->overload_name;
  }
  line << "\t";
  {
    std::lock_guard<std::mutex> lock(trace_mutex);
    if (trace_text != nullptr) {
      for (const auto& v : fn.inputs()) trace_value(line, v, true);
    }
  }
  line << "\t";
  trace_pending.push_back(line.str());
  return nullptr;
}

// Lines are written whole at an operator's end; one that calls others is written after them.
void trace_leave(const at::RecordFunction& fn, at::ObserverContext*) {
  if (!fn.operator_name()) {
    return;
  }
  --trace_depth;
  if (trace_pending.empty()) {
    return;  // begun before the trace
  }
  std::ostringstream line;
  line << trace_pending.back();
  trace_pending.pop_back();
  for (const auto& v : fn.outputs()) trace_value(line, v, false);
  std::lock_guard<std::mutex> lock(trace_mutex);
  if (trace_text == nullptr) {
    return;
  }
  *trace_text += line.str();
  *trace_text += "\n";
  if (trace_depth == 0 && std::strcmp(fn.name(), "aten::zeros") == 0) {
    for (const auto& v : fn.outputs()) {
      if (v.isTensor() && v.toTensor().defined() && v.toTensor().has_storage()) {
        trace_fresh->insert(v.toTensor().storage().data());
      }
    }
  }
}
// The allocator's reports, in the trace as `+ <address> <bytes>` and `- <address>`: which
// buffers were made inside it, and when they were let go (so that an address used again names
// a new buffer).
struct TraceMemory : public c10::MemoryReportingInfoBase {
  bool memoryProfilingEnabled() const override { return true; }
  void reportMemoryUsage(void* ptr, int64_t bytes, size_t, size_t, c10::Device) override {
    std::ostringstream line;
    if (bytes >= 0) {
      line << "+ " << reinterpret_cast<uintptr_t>(ptr) << " " << bytes << "\n";
    } else {
      line << "- " << reinterpret_cast<uintptr_t>(ptr) << "\n";
    }
    std::lock_guard<std::mutex> lock(trace_mutex);
    if (trace_text != nullptr) {
      *trace_text += line.str();
    }
  }
};
}  // namespace

// Starts the operator trace of the calling thread (and of the threads it hands work to, which
// inherit its callbacks: the autograd engine's). 0 on success, -1 when one runs already or it
// fails, with the message in `error`.
int pixel_trace_start(char* error, size_t error_len) {
  try {
    std::lock_guard<std::mutex> lock(trace_mutex);
    if (trace_text != nullptr) {
      message("an operator trace runs already", error, error_len);
      return -1;
    }
    trace_text = new std::string();
    trace_fresh = new std::unordered_set<const void*>();
    trace_here = true;
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE,
                                     std::make_shared<TraceMemory>());
    trace_handle = at::addThreadLocalCallback(at::RecordFunctionCallback(trace_enter, trace_leave)
                                                  .needsInputs(true)
                                                  .needsOutputs(true)
                                                  .scopes({at::RecordScope::FUNCTION}));
    return 0;
  } catch (const std::exception& e) {
    message(e.what(), error, error_len);
    return -1;
  }
}

// Stops the trace and returns its text (to free with pixel_trace_free), null when none runs.
char* pixel_trace_stop() {
  try {
    at::removeCallback(trace_handle);
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    trace_here = false;
    std::lock_guard<std::mutex> lock(trace_mutex);
    if (trace_text == nullptr) {
      return nullptr;
    }
    char* text = strdup(trace_text->c_str());
    delete trace_text;
    delete trace_fresh;
    trace_text = nullptr;
    trace_fresh = nullptr;
    return text;
  } catch (...) {
    return nullptr;
  }
}

void pixel_trace_free(char* text) { free(text); }

// Writes `# name` into the operator trace where this thread runs one (a place in the code that
// the trace can be cut at); nothing otherwise.
void pixel_trace_mark(const char* name) {
  if (!trace_here) {
    return;
  }
  try {
    std::lock_guard<std::mutex> lock(trace_mutex);
    if (trace_text != nullptr) {
      *trace_text += std::string("# ") + name + "\n";
    }
  } catch (...) {
  }
}
#else
int pixel_profiler_start(bool, char* error, size_t error_len) {
  message("this build has no profiler: src/native/torch_extras.cpp's profiler did not compile "
          "against its libtorch (see the build's warning)",
          error, error_len);
  return -1;
}
int pixel_profiler_stop(const char*, char* error, size_t error_len) {
  message("this build has no profiler", error, error_len);
  return -1;
}
void* pixel_range_begin(const char*) { return nullptr; }
void pixel_range_end(void*) {}
int pixel_trace_start(char* error, size_t error_len) {
  message("this build has no operator trace (no profiler)", error, error_len);
  return -1;
}
char* pixel_trace_stop() { return nullptr; }
void pixel_trace_free(char*) {}
void pixel_trace_mark(const char*) {}
#endif

#ifndef PIXEL_NO_CUDA_GRAPH
namespace {
// A CUDA graph of the work queued on one device between pixel_graph_begin and pixel_graph_end,
// captured on a stream of its own (a capture cannot use the default stream), as
// torch.cuda.graph does.
struct Graph {
  explicit Graph(c10::DeviceIndex device)
      : device(device), side(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)) {}
  c10::DeviceIndex device;
  c10::cuda::CUDAStream side;
  // The device's current stream before the graph's was made current, made current again after.
  std::optional<c10::cuda::CUDAStream> before;
  // Between capture_begin and capture_end.
  bool capturing = false;
  at::cuda::CUDAGraph graph;
};

// The graph's device current while it lives, the one before current again after. (Not
// c10::cuda::CUDAGuard: its inline implementation calls the CUDA runtime, which we do not link.)
struct OnDevice {
  explicit OnDevice(c10::DeviceIndex device) : before(c10::cuda::ExchangeDevice(device)) {}
  ~OnDevice() {
    try {
      c10::cuda::ExchangeDevice(before);
    } catch (...) {
    }
  }
  c10::DeviceIndex before;
};

void restore(Graph* g) {
  if (g->before) {
    c10::cuda::setCurrentCUDAStream(*g->before);
    g->before.reset();
  }
}

// Waits for the device and makes the graph's stream current (the one before kept).
void enter(Graph* g) {
  c10::cuda::device_synchronize();
  if (!g->before) {
    g->before = c10::cuda::getCurrentCUDAStream(g->device);
  }
  c10::cuda::setCurrentCUDAStream(g->side);
}

// Runs `f` on the graph with its device current: 0, or -1 with the exception's message in
// `error` and the stream before the graph's current again.
extern "C++" template <typename F>
int on_graph(void* graph, char* error, size_t error_len, F f) {
  auto* g = static_cast<Graph*>(graph);
  try {
    OnDevice on(g->device);
    f(g);
    return 0;
  } catch (const std::exception& e) {
    restore(g);
    message(e.what(), error, error_len);
    return -1;
  }
}
}  // namespace

// 1: this build captures CUDA graphs.
int pixel_graph_available() { return 1; }

// A graph to capture on CUDA device `device`, or null with the message in `error`.
void* pixel_graph_new(int8_t device, char* error, size_t error_len) {
  try {
    return new Graph(device);
  } catch (const std::exception& e) {
    message(e.what(), error, error_len);
    return nullptr;
  }
}

// Waits for the device, makes the graph's stream current on its device and begins capturing it
// (a private memory pool for what the capture allocates; `global` mode, so that a call that
// cannot be captured, such as a wait for the device, fails instead of being run).
int pixel_graph_begin(void* graph, char* error, size_t error_len) {
  return on_graph(graph, error, error_len, [](Graph* g) {
    enter(g);
    g->capturing = true;
    g->graph.capture_begin();
  });
}

// Waits for the device and makes the graph's stream current on its device, for steps run eagerly
// on it before the capture (as torch.cuda.graph's warm-up: what libraries set up lazily for a
// stream, such as cuBLAS's workspace, is then set up outside the capture).
int pixel_graph_enter(void* graph, char* error, size_t error_len) {
  return on_graph(graph, error, error_len, enter);
}

// Waits for the device and makes the stream before pixel_graph_enter current again.
int pixel_graph_leave(void* graph, char* error, size_t error_len) {
  return on_graph(graph, error, error_len, [](Graph* g) {
    c10::cuda::device_synchronize();
    restore(g);
  });
}

// Ends the capture (the graph is instantiated) and makes the stream before it current again.
int pixel_graph_end(void* graph, char* error, size_t error_len) {
  return on_graph(graph, error, error_len, [](Graph* g) {
    g->capturing = false;
    g->graph.capture_end();
    restore(g);
  });
}

// Launches the captured work on the device's current stream.
int pixel_graph_replay(void* graph, char* error, size_t error_len) {
  return on_graph(graph, error, error_len, [](Graph* g) { g->graph.replay(); });
}

// Frees the graph (and its memory pool once nothing else holds its blocks); a capture still
// under way (a step that failed inside it) is ended first, whatever it captured dropped.
void pixel_graph_free(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  if (g == nullptr) {
    return;
  }
  if (g->capturing) {
    try {
      OnDevice on(g->device);
      g->graph.capture_end();
    } catch (...) {
    }
  }
  try {
    restore(g);
  } catch (...) {
  }
  try {
    delete g;
  } catch (...) {
  }
}
#else
int pixel_graph_available() { return 0; }
void* pixel_graph_new(int8_t, char* error, size_t error_len) {
  message("this build has no CUDA graphs: src/native/torch_extras.cpp was built without the CUDA "
          "runtime's headers, or they did not compile (see the build's warning)",
          error, error_len);
  return nullptr;
}
int pixel_graph_begin(void*, char* error, size_t error_len) {
  message("this build has no CUDA graphs", error, error_len);
  return -1;
}
int pixel_graph_end(void*, char* error, size_t error_len) {
  message("this build has no CUDA graphs", error, error_len);
  return -1;
}
int pixel_graph_enter(void*, char* error, size_t error_len) {
  message("this build has no CUDA graphs", error, error_len);
  return -1;
}
int pixel_graph_leave(void*, char* error, size_t error_len) {
  message("this build has no CUDA graphs", error, error_len);
  return -1;
}
int pixel_graph_replay(void*, char* error, size_t error_len) {
  message("this build has no CUDA graphs", error, error_len);
  return -1;
}
void pixel_graph_free(void*) {}
#endif
}
