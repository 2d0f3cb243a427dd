// What tch does not expose of libtorch, compiled by build.rs for libtorch builds against the
// headers of the libtorch it links (no CUDA headers needed):
// - the CUDA caching allocator's statistics, what torch.cuda.max_memory_allocated and
//   torch.cuda.reset_peak_memory_stats read and reset (c10's device-allocator interface, PyTorch
//   2.9 and later; where it does not compile, build.rs defines PIXEL_NO_ALLOCATOR_STATS: none);
// - the global switches of torch.use_deterministic_algorithms and torch.backends.cudnn;
// - a backward pass from a given output gradient (tch's starts from a scalar only);
// - libtorch's profiler (Kineto, what torch.profiler runs): operators on the host, kernels and
//   copies on the GPU, saved as a Chrome trace (where it does not compile, build.rs defines
//   PIXEL_NO_PROFILER: none).
#include <ATen/Context.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstring>
#include <exception>

#ifndef PIXEL_NO_ALLOCATOR_STATS
#include <c10/core/CachingDeviceAllocator.h>
#endif
#ifndef PIXEL_NO_PROFILER
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>
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
#endif
}
