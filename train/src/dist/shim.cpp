// C ABI over libtorch's c10d (TCPStore rendezvous, ProcessGroupGloo on CPU, ProcessGroupNCCL on
// CUDA) for the Rust side in mod.rs. Tensors arrive as the `at::Tensor*` that tch's
// `as_mut_ptr()` hands out; results land in place. Every C++ exception is caught here and returned
// as a malloc'd message (freed by `ofd_free_string`): nothing unwinds into Rust.
//
// Build switches (set by build.rs): USE_C10D_GLOO (always; needs Debian's libgloo-dev headers),
// OVERFILL_NCCL + USE_C10D_NCCL + USE_CUDA (only when the NCCL/CUDA header wheels are present).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef OVERFILL_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

// Runs `body`, turning any exception into an error string (nullptr = success).
template <typename F>
char* guarded(const char* what, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(std::string(what) + ": " + e.what());
  } catch (...) {
    return copy_message(std::string(what) + ": unknown C++ exception");
  }
}

}  // namespace

struct OfdGroup {
  c10::intrusive_ptr<c10d::Store> store;  // PrefixStore over the TCPStore: the group's keys
  c10::intrusive_ptr<c10d::Store> user_store;  // PrefixStore for the Rust side's own keys
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  int rank;
  int world_size;
};

namespace {

void wait_work(OfdGroup* group, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(group->timeout)) {
    throw std::runtime_error("collective did not complete");
  }
}

std::vector<at::Tensor> tensor_list(at::Tensor** tensors, size_t count) {
  std::vector<at::Tensor> out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

}  // namespace

extern "C" {

void ofd_free_string(char* s) { std::free(s); }

int ofd_has_nccl() {
#ifdef OVERFILL_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous at master_addr:master_port (rank 0 hosts the TCPStore) and create the process group.
// backend: "gloo" or "nccl". device_index: the CUDA device of this rank (NCCL only).
char* ofd_group_new(const char* backend, const char* master_addr, int master_port, int rank, int world_size,
                    int64_t timeout_ms, int device_index, OfdGroup** out) {
  *out = nullptr;
  std::string backend_name(backend);
  return guarded("process group set-up", [&] {
    auto group = std::make_unique<OfdGroup>();
    group->timeout = std::chrono::milliseconds(timeout_ms);
    group->rank = rank;
    group->world_size = world_size;
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(master_port);
    options.isServer = rank == 0;
    options.numWorkers = world_size;
    options.waitWorkers = true;
    options.timeout = group->timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), options);
    group->store = c10::make_intrusive<c10d::PrefixStore>("overfill/" + backend_name, tcp);
    group->user_store = c10::make_intrusive<c10d::PrefixStore>("overfill/user", tcp);
    if (backend_name == "gloo") {
      // torch.distributed's defaults: the interfaces in GLOO_SOCKET_IFNAME, else the address this
      // host's name resolves to (loopback when it does not resolve); two threads per device.
      auto gloo_options = c10d::ProcessGroupGloo::Options::create_default(group->timeout);
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world_size, gloo_options);
    } else if (backend_name == "nccl") {
#ifdef OVERFILL_NCCL
      // One GPU per rank: bind it before NCCL creates its communicators on it.
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = group->timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, world_size, nccl_options);
#else
      (void)device_index;
      throw std::runtime_error(
          "this overfill was built without NCCL (the NCCL/CUDA headers were not found at build time; see "
          "scripts/setup.sh): CUDA training across processes is unavailable");
#endif
    } else {
      throw std::runtime_error("unknown backend " + backend_name + " (gloo or nccl)");
    }
    *out = group.release();
  });
}

void ofd_group_free(OfdGroup* group) {
  if (group == nullptr) return;
  try {
    delete group;
  } catch (...) {
  }
}

char* ofd_broadcast(OfdGroup* group, at::Tensor** tensors, size_t count, int root) {
  return guarded("broadcast", [&] {
    auto list = tensor_list(tensors, count);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    // One tensor per call: Gloo's broadcast takes one tensor per device.
    for (auto& t : list) {
      std::vector<at::Tensor> one{t};
      wait_work(group, group->backend->broadcast(one, opts));
    }
  });
}

// Sum all-reduce in place of each tensor; tensors of one dtype and device are flattened into buckets
// of at most bucket_bytes (one collective per bucket, all in flight before the copies back).
char* ofd_all_reduce_sum(OfdGroup* group, at::Tensor** tensors, size_t count, int64_t bucket_bytes) {
  return guarded("all-reduce", [&] {
    auto list = tensor_list(tensors, count);
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    // Buckets: consecutive runs of tensors with the same dtype and device, each up to bucket_bytes.
    std::vector<std::vector<size_t>> buckets;
    int64_t current_bytes = 0;
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
      bool same_kind = !buckets.empty() && list[buckets.back().front()].scalar_type() == t.scalar_type() &&
                       list[buckets.back().front()].device() == t.device();
      if (buckets.empty() || !same_kind || current_bytes + bytes > bucket_bytes) {
        buckets.emplace_back();
        current_bytes = 0;
      }
      buckets.back().push_back(i);
      current_bytes += bytes;
    }
    // Keep a few buckets in flight: the next one is flattened while the previous ones reduce.
    const size_t in_flight = 2;
    std::vector<at::Tensor> flats(buckets.size());
    std::vector<c10::intrusive_ptr<c10d::Work>> works(buckets.size());
    auto finish = [&](size_t b) {
      wait_work(group, works[b]);
      const auto& bucket = buckets[b];
      if (bucket.size() == 1 && flats[b].data_ptr() == list[bucket[0]].data_ptr()) {
        flats[b] = at::Tensor();
        return;  // reduced in place
      }
      int64_t offset = 0;
      for (size_t i : bucket) {
        auto& t = list[i];
        t.copy_(flats[b].narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
      flats[b] = at::Tensor();
    };
    for (size_t b = 0; b < buckets.size(); ++b) {
      const auto& bucket = buckets[b];
      const auto& first = list[bucket[0]];
      if (bucket.size() == 1 && first.is_contiguous()) {
        flats[b] = first;
      } else {
        std::vector<at::Tensor> views;
        views.reserve(bucket.size());
        for (size_t i : bucket) views.push_back(list[i].reshape({-1}));
        flats[b] = at::cat(views);
      }
      std::vector<at::Tensor> one{flats[b]};
      works[b] = group->backend->allreduce(one, opts);
      if (b >= in_flight) finish(b - in_flight);
    }
    size_t first_open = buckets.size() > in_flight ? buckets.size() - in_flight : 0;
    for (size_t b = first_open; b < buckets.size(); ++b) finish(b);
  });
}

// output (n elements) = the sum over ranks of input[rank * n .. (rank + 1) * n] (input: world_size * n).
char* ofd_reduce_scatter_sum(OfdGroup* group, at::Tensor* output, at::Tensor* input) {
  return guarded("reduce-scatter", [&] {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    at::Tensor out = *output;
    at::Tensor in = input->contiguous();
    if (in.numel() != out.numel() * group->world_size) {
      throw std::runtime_error("input has " + std::to_string(in.numel()) + " elements, expected world size × " +
                               std::to_string(out.numel()));
    }
    at::Tensor out_contiguous = out.is_contiguous() ? out : out.contiguous();
    wait_work(group, group->backend->_reduce_scatter_base(out_contiguous, in, opts));
    if (!out.is_contiguous()) out.copy_(out_contiguous);
  });
}

// output (world_size * n elements) = every rank's input (n elements), in rank order.
char* ofd_all_gather(OfdGroup* group, at::Tensor* output, at::Tensor* input) {
  return guarded("all-gather", [&] {
    c10d::AllgatherOptions opts;
    opts.timeout = group->timeout;
    at::Tensor out = *output;
    at::Tensor in = input->contiguous();
    if (out.numel() != in.numel() * group->world_size) {
      throw std::runtime_error("output has " + std::to_string(out.numel()) + " elements, expected world size × " +
                               std::to_string(in.numel()));
    }
    at::Tensor out_contiguous = out.is_contiguous() ? out : out.contiguous();
    wait_work(group, group->backend->_allgather_base(out_contiguous, in, opts));
    if (!out.is_contiguous()) out.copy_(out_contiguous);
  });
}

char* ofd_barrier(OfdGroup* group) {
  return guarded("barrier", [&] {
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait_work(group, group->backend->barrier(opts));
  });
}

// The rendezvous store, for the Rust side's bookkeeping (liveness, progress of each rank).
char* ofd_store_set(OfdGroup* group, const char* key, const uint8_t* value, size_t len) {
  return guarded("store set", [&] {
    group->user_store->set(std::string(key), std::vector<uint8_t>(value, value + len));
  });
}

// *found = 0 when the key is absent (no waiting); otherwise *out/*out_len hold a malloc'd copy.
char* ofd_store_get(OfdGroup* group, const char* key, int* found, uint8_t** out, size_t* out_len) {
  *found = 0;
  *out = nullptr;
  *out_len = 0;
  return guarded("store get", [&] {
    std::string k(key);
    bool present = group->user_store->check({k});
    if (present) {
      auto value = group->user_store->get(k);
      *out = static_cast<uint8_t*>(std::malloc(value.size() + 1));
      if (*out == nullptr) throw std::runtime_error("out of memory");
      std::memcpy(*out, value.data(), value.size());
      *out_len = value.size();
      *found = 1;
    }
  });
}

void ofd_free_bytes(uint8_t* bytes) { std::free(bytes); }

}  // extern "C"
