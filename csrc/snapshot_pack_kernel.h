// The multi-tensor pack kernel of fastsd::pack_tensors on CUDA, written once for two compilers.
//
// The host describes every source (pointer, dtype, destination range, and sizes/strides for the
// non-contiguous ones) and every thread block (which source, which chunk of it) in one table,
// built by build_pack_table(). Each block converts one chunk of kChunk elements of one source:
// contiguous sources with vector loads and stores, strided ones element by element.
//
// nvcc compiles pack_block() into the kernel (snapshot_pack_cuda.cu, one launch for the list).
// The host compiler compiles the same code for fastsd::_pack_tensors_cuda_emulated
// (snapshot_pack.cpp), which runs every block and thread of that launch one after another on
// the CPU: the table, the chunking, the alignment tests of the vector path and the strided
// indexing of the CUDA kernel are thus checked on machines without a GPU.
#pragma once

#include "snapshot_pack.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define FASTSD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSD_HOST_DEVICE inline
#endif

namespace fastsd {
namespace snapshot {

constexpr int kThreads = 256;                             // threads per block
constexpr int kVec = 4;                                   // elements per vector load
constexpr int kVecsPerThread = 8;                         // vector loads per thread and chunk
constexpr int64_t kChunk = int64_t{kThreads} * kVec * kVecsPerThread;  // elements per block

// One source as the kernel sees it: 32 bytes; the layout of a strided source is in a side table.
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

// The table of one launch, in one host buffer (pinned for the CUDA path, which copies it to the
// device with one asynchronous transfer): [DeviceItem x items][DeviceLayout x layouts][BlockTask
// x blocks]. The views below take the buffer's base address (host or device copy).
struct PackTable {
  at::Tensor host;  // uint8
  int64_t items_bytes = 0, layouts_bytes = 0, num_blocks = 0;

  template <typename Byte>
  const DeviceItem* items(Byte* base) const {
    return reinterpret_cast<const DeviceItem*>(base);
  }
  template <typename Byte>
  const DeviceLayout* layouts(Byte* base) const {
    return reinterpret_cast<const DeviceLayout*>(base + items_bytes);
  }
  template <typename Byte>
  const BlockTask* tasks(Byte* base) const {
    return reinterpret_cast<const BlockTask*>(base + items_bytes + layouts_bytes);
  }
};

// The table for `plan` (snapshot_pack.cpp); num_blocks == 0 means there is nothing to copy.
PackTable build_pack_table(const std::vector<PackItem>& plan, bool pinned);

template <typename T>
struct alignas(sizeof(T) * kVec) VecOf {
  T val[kVec];
};

template <typename src_t, typename dst_t>
FASTSD_HOST_DEVICE dst_t cast_to_dst(src_t v) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    return v;  // a plain copy keeps every bit
  } else {
    // via float32, as ATen converts: float64 is rounded to float32 first, then to 16 bits (RNE)
    return static_cast<dst_t>(static_cast<float>(v));
  }
}

// Thread `thread` of `threads` converts its share of elements [begin, begin + n) of one source.
template <typename src_t, typename dst_t>
FASTSD_HOST_DEVICE void pack_chunk(const DeviceItem& item, const DeviceLayout* layouts,
                                   int64_t begin, int n, dst_t* __restrict__ out, int thread,
                                   int threads) {
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
      if (nvec == kVecsPerThread * threads) {
        // A whole chunk: every load of the thread is issued before its first store. The compiler
        // cannot tell that `in` and `out` do not overlap, so in the loop below each load waits
        // for the store before it, one memory round trip per vector (as the sm_90 SASS
        // shows); kVecsPerThread loads in flight per thread is what keeps HBM busy.
        VecOf<src_t> x[kVecsPerThread];
#pragma unroll
        for (int j = 0; j < kVecsPerThread; ++j) x[j] = vin[thread + j * threads];
#pragma unroll
        for (int j = 0; j < kVecsPerThread; ++j) {
          VecOf<dst_t> y;
#pragma unroll
          for (int k = 0; k < kVec; ++k) y.val[k] = cast_to_dst<src_t, dst_t>(x[j].val[k]);
          vout[thread + j * threads] = y;
        }
        return;
      }
      for (int v = thread; v < nvec; v += threads) {  // the last, partial chunk of a source
        const VecOf<src_t> x = vin[v];
        VecOf<dst_t> y;
#pragma unroll
        for (int k = 0; k < kVec; ++k) y.val[k] = cast_to_dst<src_t, dst_t>(x.val[k]);
        vout[v] = y;
      }
      done = nvec * kVec;
    }
    for (int i = done + thread; i < n; i += threads) {
      out[i] = cast_to_dst<src_t, dst_t>(in[i]);
    }
    return;
  }
  const DeviceLayout& layout = layouts[item.layout];
  const int ndim = static_cast<int>(layout.ndim);
  const src_t* __restrict__ in = static_cast<const src_t*>(item.src);
  for (int i = thread; i < n; i += threads) {
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

// The work of thread `thread` of block `block`: the body of the CUDA kernel.
template <typename dst_t>
FASTSD_HOST_DEVICE void pack_block(const BlockTask* __restrict__ tasks,
                                   const DeviceItem* __restrict__ items,
                                   const DeviceLayout* __restrict__ layouts,
                                   dst_t* __restrict__ dst, int64_t block, int thread,
                                   int threads) {
  const BlockTask task = tasks[block];
  const DeviceItem item = items[task.item];
  const int64_t begin = int64_t{task.chunk} * kChunk;
  const int n = static_cast<int>(item.numel - begin < kChunk ? item.numel - begin : kChunk);
  dst_t* out = dst + item.dst_offset + begin;
  switch (item.src_type) {
    case kSrcFloat:
      pack_chunk<float, dst_t>(item, layouts, begin, n, out, thread, threads);
      break;
    case kSrcHalf:
      pack_chunk<c10::Half, dst_t>(item, layouts, begin, n, out, thread, threads);
      break;
    case kSrcBFloat16:
      pack_chunk<c10::BFloat16, dst_t>(item, layouts, begin, n, out, thread, threads);
      break;
    case kSrcDouble:
      pack_chunk<double, dst_t>(item, layouts, begin, n, out, thread, threads);
      break;
    default: break;
  }
}

}  // namespace snapshot
}  // namespace fastsd
