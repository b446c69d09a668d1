// fastsd::pack_tensors on CUDA: the whole list in one kernel launch, on the current stream.
//
// The host describes every source (pointer, dtype, destination range, and sizes/strides for the
// non-contiguous ones) and every thread block (which source, which chunk of it) in one table,
// copied to the device from pinned memory on the current stream just before the launch. Each
// block converts one chunk of kChunk elements of one source: contiguous sources with vector loads
// and stores, strided ones element by element. Chunks are small enough that a list of hundreds of
// tensors of very different sizes keeps every SM busy.
#include "snapshot_pack.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>

namespace fastsd {
namespace snapshot {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;                                // elements per vector load
constexpr int64_t kChunk = int64_t{kThreads} * kVec * 8;  // elements per block

// One source as the device sees it: 32 bytes; the layout of a strided source is in a side table.
struct DeviceItem {
  const void* src;
  int64_t dst_offset;
  int64_t numel;
  int32_t src_type;
  int32_t layout;  // -1: contiguous; otherwise an index into the table of DeviceLayout
};

struct DeviceLayout {
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
  int64_t ndim;
};

struct BlockTask {
  int32_t item;   // which source
  int32_t chunk;  // which chunk of it
};

template <typename T>
struct alignas(sizeof(T) * kVec) VecOf {
  T val[kVec];
};

template <typename src_t, typename dst_t>
__device__ __forceinline__ dst_t cast_to_dst(src_t v) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    return v;  // a plain copy keeps every bit
  } else {
    // via float32, as ATen converts: float64 is rounded to float32 first, then to 16 bits (RNE)
    return static_cast<dst_t>(static_cast<float>(v));
  }
}

template <typename src_t, typename dst_t>
__device__ void pack_chunk(const DeviceItem& item, const DeviceLayout* layouts, int64_t begin,
                           int n, dst_t* __restrict__ out) {
  if (item.layout < 0) {
    const src_t* __restrict__ in = static_cast<const src_t*>(item.src) + begin;
    // begin is a multiple of kVec, so the alignment of the base pointers decides
    const bool aligned = reinterpret_cast<uintptr_t>(in) % sizeof(VecOf<src_t>) == 0 &&
                         reinterpret_cast<uintptr_t>(out) % sizeof(VecOf<dst_t>) == 0;
    int done = 0;
    if (aligned) {
      const int nvec = n / kVec;
      const auto* vin = reinterpret_cast<const VecOf<src_t>*>(in);
      auto* vout = reinterpret_cast<VecOf<dst_t>*>(out);
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        const VecOf<src_t> x = vin[v];
        VecOf<dst_t> y;
#pragma unroll
        for (int k = 0; k < kVec; ++k) y.val[k] = cast_to_dst<src_t, dst_t>(x.val[k]);
        vout[v] = y;
      }
      done = nvec * kVec;
    }
    for (int i = done + threadIdx.x; i < n; i += blockDim.x) {
      out[i] = cast_to_dst<src_t, dst_t>(in[i]);
    }
    return;
  }
  const DeviceLayout& layout = layouts[item.layout];
  const int ndim = static_cast<int>(layout.ndim);
  const src_t* __restrict__ in = static_cast<const src_t*>(item.src);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t linear = begin + i;
    int64_t offset = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t size = layout.sizes[d];
      offset += (linear % size) * layout.strides[d];
      linear /= size;
    }
    out[i] = cast_to_dst<src_t, dst_t>(in[offset]);
  }
}

template <typename dst_t>
__global__ void __launch_bounds__(kThreads)
pack_tensors_kernel(const BlockTask* __restrict__ tasks, const DeviceItem* __restrict__ items,
                    const DeviceLayout* __restrict__ layouts, dst_t* __restrict__ dst) {
  const BlockTask task = tasks[blockIdx.x];
  const DeviceItem item = items[task.item];
  const int64_t begin = int64_t{task.chunk} * kChunk;
  const int n = static_cast<int>(item.numel - begin < kChunk ? item.numel - begin : kChunk);
  dst_t* out = dst + item.dst_offset + begin;
  switch (item.src_type) {
    case kSrcFloat: pack_chunk<float, dst_t>(item, layouts, begin, n, out); break;
    case kSrcHalf: pack_chunk<c10::Half, dst_t>(item, layouts, begin, n, out); break;
    case kSrcBFloat16: pack_chunk<c10::BFloat16, dst_t>(item, layouts, begin, n, out); break;
    case kSrcDouble: pack_chunk<double, dst_t>(item, layouts, begin, n, out); break;
    default: break;
  }
}

int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

void pack_tensors_cuda(at::TensorList srcs, const at::Tensor& dst,
                       at::OptionalIntArrayRef offsets) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<PackItem> plan = plan_pack(srcs, dst, offsets, keep_alive);

  int64_t num_blocks = 0;
  int64_t num_layouts = 0;
  for (const PackItem& p : plan) {
    num_blocks += (p.numel + kChunk - 1) / kChunk;
    if (!item_is_contiguous(p)) ++num_layouts;
  }
  if (num_blocks == 0) return;
  TORCH_CHECK(num_blocks <= std::numeric_limits<int32_t>::max() &&
                  plan.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "fastsd::pack_tensors: too many elements for one launch (", num_blocks,
              " chunks of ", kChunk, ")");

  // One table, in pinned memory, copied with one asynchronous transfer:
  // [DeviceItem x items][DeviceLayout x layouts][BlockTask x blocks]
  const int64_t items_bytes = align_up(plan.size() * sizeof(DeviceItem), 64);
  const int64_t layouts_bytes = align_up(num_layouts * sizeof(DeviceLayout), 64);
  const int64_t tasks_bytes = num_blocks * sizeof(BlockTask);
  at::Tensor host = at::empty({items_bytes + layouts_bytes + tasks_bytes},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* base = host.data_ptr<uint8_t>();
  auto* h_items = reinterpret_cast<DeviceItem*>(base);
  auto* h_layouts = reinterpret_cast<DeviceLayout*>(base + items_bytes);
  auto* h_tasks = reinterpret_cast<BlockTask*>(base + items_bytes + layouts_bytes);
  int32_t layout_index = 0;
  int64_t block = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const PackItem& p = plan[i];
    DeviceItem& d = h_items[i];
    d.src = p.src;
    d.dst_offset = p.dst_offset;
    d.numel = p.numel;
    d.src_type = p.src_type;
    d.layout = -1;
    if (!item_is_contiguous(p)) {
      DeviceLayout& l = h_layouts[layout_index];
      std::memset(&l, 0, sizeof(l));
      for (int k = 0; k < p.ndim; ++k) {
        l.sizes[k] = p.sizes[k];
        l.strides[k] = p.strides[k];
      }
      l.ndim = p.ndim;
      d.layout = layout_index++;
    }
    const int64_t chunks = (p.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      h_tasks[block++] = BlockTask{static_cast<int32_t>(i), static_cast<int32_t>(c)};
    }
  }

  const c10::cuda::CUDAGuard guard(dst.device());
  // non_blocking from pinned memory: the copy is queued on the current stream and the caching
  // host allocator keeps the pinned block until it has completed.
  const at::Tensor table = host.to(dst.device(), at::kByte, /*non_blocking=*/true);
  const uint8_t* d_base = table.const_data_ptr<uint8_t>();
  const auto* d_items = reinterpret_cast<const DeviceItem*>(d_base);
  const auto* d_layouts = reinterpret_cast<const DeviceLayout*>(d_base + items_bytes);
  const auto* d_tasks = reinterpret_cast<const BlockTask*>(d_base + items_bytes + layouts_bytes);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_blocks));
  switch (dst.scalar_type()) {
    case at::kHalf:
      pack_tensors_kernel<c10::Half><<<grid, kThreads, 0, stream>>>(
          d_tasks, d_items, d_layouts, dst.data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      pack_tensors_kernel<c10::BFloat16><<<grid, kThreads, 0, stream>>>(
          d_tasks, d_items, d_layouts, dst.data_ptr<c10::BFloat16>());
      break;
    default:
      pack_tensors_kernel<float><<<grid, kThreads, 0, stream>>>(
          d_tasks, d_items, d_layouts, dst.data_ptr<float>());
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `table` and `keep_alive` may be freed now: the caching allocator reuses their memory only
  // for work queued later on this stream, i.e. after the kernel.
}

}  // namespace
}  // namespace snapshot
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd, CUDA, m) {
  m.impl("pack_tensors", &fastsd::snapshot::pack_tensors_cuda);
}
