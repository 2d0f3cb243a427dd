// The CUDA caching allocator's statistics, which tch does not expose: what
// torch.cuda.max_memory_allocated and torch.cuda.reset_peak_memory_stats read and reset.
// Compiled by build.rs for libtorch builds, against the headers of the libtorch it links; it
// needs no CUDA headers (c10's device-allocator interface, PyTorch 2.9 and later). Where that
// interface does not compile, build.rs compiles it with PIXEL_NO_ALLOCATOR_STATS: no statistics.
#include <cstdint>

#ifndef PIXEL_NO_ALLOCATOR_STATS
#include <c10/core/CachingDeviceAllocator.h>
#endif

extern "C" {
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
}
