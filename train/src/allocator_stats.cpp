// Live and peak bytes of libtorch's tensors for `memory.rs`. CUDA: the caching allocator's own
// statistics (in CUDA builds only). CPU: a counting wrapper around libtorch's own CPU allocator,
// installed on request (`ofm_count_cpu_allocations`), since libtorch keeps statistics only for
// CUDA; on a CPU the alternative, the resident set size, also counts the freed memory glibc keeps
// and its fragmentation, which is no measure of what the trainer holds. The memory planner
// (`memory_plan.rs`) is checked against these counts; RSS is reported beside them.
//
// Only allocations made after installation are counted (their frees are matched exactly by
// address), so install it before loading the models.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#ifdef OVERFILL_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace {

std::atomic<int64_t> live_bytes{0};
std::atomic<int64_t> peak_bytes{0};

// Every counted allocation by its address: its size, and the inner allocation (freed with it).
// The pointer doubles as the DataPtr's context, as some kernels (oneDNN's bf16 matmul through
// `raw_allocate`) require of a CPU allocator.
std::mutex allocations_mutex;
std::unordered_map<void*, std::pair<c10::DataPtr, int64_t>> allocations;

void raise_peak(int64_t now) {
  int64_t peak = peak_bytes.load();
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
  }
}

void release(void* data) {
  c10::DataPtr inner;  // destroyed (freed) after the lock is let go
  {
    std::lock_guard<std::mutex> lock(allocations_mutex);
    auto found = allocations.find(data);
    if (found == allocations.end()) {
      return;  // not ours: cannot happen, as only our DataPtrs carry this deleter
    }
    live_bytes.fetch_sub(found->second.second);
    inner = std::move(found->second.first);
    allocations.erase(found);
  }
}

class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    c10::Device device = inner.device();
    if (data == nullptr) {
      return inner;  // zero bytes: nothing to count
    }
    {
      std::lock_guard<std::mutex> lock(allocations_mutex);
      allocations.emplace(data, std::make_pair(std::move(inner), static_cast<int64_t>(n)));
    }
    raise_peak(live_bytes.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n));
    return {data, data, &release, device};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* inner_;
};

}  // namespace

extern "C" {

// Installs the counting allocator as libtorch's CPU allocator (once; later calls do nothing).
void ofm_count_cpu_allocations() {
  static std::once_flag once;
  std::call_once(once, [] {
    static CountingAllocator counting(c10::GetCPUAllocator());
    c10::SetCPUAllocator(&counting, /*priority=*/1);
  });
}

// Bytes of counted CPU tensors alive now, and the most alive at once since the last reset.
void ofm_cpu_allocated(int64_t* live, int64_t* peak) {
  *live = live_bytes.load();
  *peak = peak_bytes.load();
}

// Starts a new peak from what is alive now.
void ofm_reset_cpu_peak() { peak_bytes.store(live_bytes.load()); }

// The CUDA caching allocator's bytes allocated now and at peak on `device`; returns 0 (and
// leaves both untouched) in a build without CUDA.
int ofm_cuda_allocated(int device, int64_t* live, int64_t* peak) {
#ifdef OVERFILL_NCCL
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  const auto& bytes = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  *live = bytes.current;
  *peak = bytes.peak;
  return 1;
#else
  return 0;
#endif
}

void ofm_reset_cuda_peak(int device) {
#ifdef OVERFILL_NCCL
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#endif
}

}  // extern "C"
