// fastsd::pack_tensors: copy a list of tensors into one preallocated flat buffer, converting the
// dtype on the way. Shared by the CPU kernel (snapshot_pack.cpp) and the CUDA kernel
// (snapshot_pack_cuda.cu).
//
// Semantics: source i (any shape, any strides) is written into
//   dst[offsets[i] : offsets[i] + srcs[i].numel()]
// in its logical row-major order, i.e. exactly what `dst[o:o+n].copy_(src.reshape(-1))` would
// write, with the rounding of `src.to(dst.dtype)` (round to nearest even). Without offsets the
// sources are laid out back to back from 0. A caller that wants a source kept in its own memory
// order (channels_last) passes a permuted view whose row-major order is that memory order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastsd {
namespace snapshot {

// At most this many dimensions after merging the ones that are contiguous with each other; a
// source with more is copied to a contiguous temporary first (never happens for real weights).
constexpr int kMaxDims = 6;

// Source dtypes, as the kernels see them.
enum SrcType : int32_t { kSrcFloat = 0, kSrcHalf = 1, kSrcBFloat16 = 2, kSrcDouble = 3 };

// One source, described for the kernels. Plain data, so that it can be copied to the device.
struct PackItem {
  const void* src;        // first element of the source (data_ptr, storage offset included)
  int64_t dst_offset;     // first element of its range in dst
  int64_t numel;
  int64_t sizes[kMaxDims];    // logical sizes after merging dims; sizes[ndim-1] is innermost
  int64_t strides[kMaxDims];  // in elements
  int32_t ndim;               // 1 with strides[0] == 1 means contiguous
  int32_t src_type;           // SrcType
};

// Validates the arguments (every device), raising an error that names the offending source, and
// returns one PackItem per source. `keep_alive` receives contiguous temporaries made for
// sources with more than kMaxDims non-mergeable dims; it must outlive the kernel.
std::vector<PackItem> plan_pack(const at::TensorList& srcs, const at::Tensor& dst,
                                const c10::OptionalIntArrayRef& offsets,
                                std::vector<at::Tensor>& keep_alive);

inline bool item_is_contiguous(const PackItem& item) {
  return item.ndim == 1 && item.strides[0] == 1;
}

}  // namespace snapshot
}  // namespace fastsd
