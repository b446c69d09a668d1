// fastsd::pack_tensors: schema, argument checks and the CPU kernel (see snapshot_pack.h for the
// semantics). The CUDA kernel is in snapshot_pack_cuda.cu, so that a CPU-only build links; the
// table it reads is built here, and fastsd::_pack_tensors_cuda_emulated runs its code on the CPU.
#include "snapshot_pack.h"
#include "snapshot_pack_kernel.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSD_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace fastsd {
namespace snapshot {

namespace {

int32_t src_type_of(const at::Tensor& src, size_t i) {
  switch (src.scalar_type()) {
    case at::kFloat: return kSrcFloat;
    case at::kHalf: return kSrcHalf;
    case at::kBFloat16: return kSrcBFloat16;
    case at::kDouble: return kSrcDouble;
    default:
      TORCH_CHECK_TYPE(false, "fastsd::pack_tensors: srcs[", i, "] has dtype ", src.scalar_type(),
                       "; only float32, float16, bfloat16 and float64 tensors can be packed "
                       "(copy integer tensors with Tensor.copy_)");
  }
  return kSrcFloat;
}

// Whether the bytes a non-empty src spans (from its first element to its last; torch's strides
// are never negative) meet those of dst, which is contiguous.
bool bytes_overlap(const at::Tensor& src, const at::Tensor& dst) {
  int64_t last = 0;
  for (int64_t d = 0; d < src.dim(); ++d) last += (src.size(d) - 1) * src.stride(d);
  const auto* src_begin = static_cast<const char*>(src.const_data_ptr());
  const auto* src_end = src_begin + (last + 1) * src.element_size();
  const auto* dst_begin = static_cast<const char*>(dst.const_data_ptr());
  const auto* dst_end = dst_begin + dst.numel() * dst.element_size();
  return src_begin < dst_end && dst_begin < src_end;
}

// Merges dims that are contiguous with each other and drops size-1 dims, so that a contiguous
// tensor becomes one dim of stride 1 and e.g. a transposed matrix stays two dims. Returns false
// when more than kMaxDims dims remain.
bool describe_layout(const at::Tensor& src, PackItem& item) {
  int64_t sizes[64];
  int64_t strides[64];
  int ndim = 0;
  for (int64_t d = 0; d < src.dim(); ++d) {  // outermost first
    const int64_t size = src.size(d);
    const int64_t stride = src.stride(d);
    if (size == 1) continue;
    if (ndim > 0 && strides[ndim - 1] == size * stride) {
      sizes[ndim - 1] *= size;
      strides[ndim - 1] = stride;
    } else {
      if (ndim == 64) return false;
      sizes[ndim] = size;
      strides[ndim] = stride;
      ++ndim;
    }
  }
  if (ndim == 0 || src.numel() == 0) {  // a scalar, all dims of size 1, or empty
    item.ndim = 1;
    item.sizes[0] = src.numel();
    item.strides[0] = 1;
    return true;
  }
  if (ndim > kMaxDims) return false;
  item.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    item.sizes[d] = sizes[d];
    item.strides[d] = strides[d];
  }
  return true;
}

}  // namespace

std::vector<PackItem> plan_pack(const at::TensorList& srcs, const at::Tensor& dst,
                                const c10::OptionalIntArrayRef& offsets,
                                std::vector<at::Tensor>& keep_alive) {
  TORCH_CHECK(dst.defined(), "fastsd::pack_tensors: dst is undefined");
  TORCH_CHECK(dst.dim() == 1 && dst.is_contiguous(),
              "fastsd::pack_tensors: dst must be a contiguous 1-D (flat) buffer, got shape ",
              dst.sizes(), " and strides ", dst.strides());
  TORCH_CHECK_TYPE(dst.scalar_type() == at::kHalf || dst.scalar_type() == at::kBFloat16 ||
                       dst.scalar_type() == at::kFloat,
                   "fastsd::pack_tensors: dst must be float16, bfloat16 or float32, got ",
                   dst.scalar_type());
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->size() == srcs.size(), "fastsd::pack_tensors: got ", offsets->size(),
                " offsets for ", srcs.size(), " sources; pass one offset per source (or none)");
  }
  std::vector<PackItem> items(srcs.size());
  int64_t next = 0;
  for (size_t i = 0; i < srcs.size(); ++i) {
    at::Tensor src = srcs[i];
    TORCH_CHECK(src.defined(), "fastsd::pack_tensors: srcs[", i, "] is undefined");
    TORCH_CHECK(src.device() == dst.device(), "fastsd::pack_tensors: srcs[", i, "] is on ",
                src.device(), " but dst is on ", dst.device(),
                "; move the sources to the buffer's device first");
    const int32_t src_type = src_type_of(src, i);
    const int64_t numel = src.numel();
    const int64_t offset = offsets.has_value() ? (*offsets)[i] : next;
    TORCH_CHECK(offset >= 0 && offset <= dst.numel() && numel <= dst.numel() - offset,
                "fastsd::pack_tensors: srcs[", i, "] (", numel, " elements) at offset ", offset,
                " does not fit in dst of ", dst.numel(), " elements");
    next = offset + numel;
    if (numel > 0 && src.is_alias_of(dst)) {
      // The same storage is fine where the bytes differ (a store's slot 0 captured into its
      // slot 1, through a teacher's views); reading bytes the launch writes is a race.
      TORCH_CHECK(!bytes_overlap(src, dst), "fastsd::pack_tensors: srcs[", i,
                  "] reads memory that dst holds; pack from a separate tensor (e.g. a clone)");
    }
    if (src.is_neg()) {  // a lazily negated view: materialise, the kernels read raw memory
      src = src.resolve_neg();
      keep_alive.push_back(src);
    }
    PackItem& item = items[i];
    if (!describe_layout(src, item)) {
      src = src.contiguous();
      keep_alive.push_back(src);
      item.ndim = 1;
      item.sizes[0] = numel;
      item.strides[0] = 1;
    }
    item.src = src.const_data_ptr();
    item.dst_offset = offset;
    item.numel = numel;
    item.src_type = src_type;
  }
  if (offsets.has_value() && items.size() > 1) {
    std::vector<size_t> order(items.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return items[a].dst_offset < items[b].dst_offset;
    });
    int64_t end = 0;
    size_t last = 0;
    bool any = false;
    for (size_t k : order) {
      if (items[k].numel == 0) continue;
      TORCH_CHECK(!any || items[k].dst_offset >= end, "fastsd::pack_tensors: the ranges of srcs[",
                  last, "] and srcs[", k, "] overlap in dst (offsets ", items[last].dst_offset,
                  " and ", items[k].dst_offset, "); give every source its own range");
      end = items[k].dst_offset + items[k].numel;
      last = k;
      any = true;
    }
  }
  // dst is written in place: its version moves, as copy_ moves it, so that autograd refuses a
  // backward through a teacher's weights (views of a slot) that a capture has overwritten since.
  // (The schema returns nothing, so torch's boxed ADInplaceOrView fallback, which bumps the
  // versions of returned aliases, would not do it.) An inference tensor outside inference mode
  // is refused here with torch's own message.
  dst.unsafeGetTensorImpl()->bump_version();
  return items;
}

namespace {

// ---- conversion of a contiguous run ------------------------------------------------------------
// Bit-exact with Tensor.to(): round to nearest even, and the NaN encodings of ATen's CPU kernels
// (float16: the hardware's F16C conversion; bfloat16: 0xFFFF, from ATen's vectorised path).

#ifdef FASTSD_X86_KERNELS
bool cpu_has_avx2_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}

__attribute__((target("avx2,f16c"))) void float_to_half_avx2(const float* src, c10::Half* dst,
                                                              int64_t n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound);
    const __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 8), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), b);
  }
  for (; i < n; i += 8) {  // the tail goes through the same instruction, via a padded copy
    const int64_t m = std::min<int64_t>(8, n - i);
    float in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint16_t out[8];
    std::memcpy(in, src + i, m * sizeof(float));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(_mm256_loadu_ps(in), kRound));
    std::memcpy(dst + i, out, m * sizeof(uint16_t));
  }
}

__attribute__((target("avx2"))) inline __m128i bfloat16_from_8_floats(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  // round to nearest even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  r = _mm256_blendv_epi8(_mm256_set1_epi32(0xFFFF), r, ordered);
  // every lane is <= 0xFFFF, so the unsigned saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

__attribute__((target("avx2"))) void float_to_bfloat16_avx2(const float* src, c10::BFloat16* dst,
                                                            int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = bfloat16_from_8_floats(_mm256_loadu_ps(src + i));
    const __m128i b = bfloat16_from_8_floats(_mm256_loadu_ps(src + i + 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), b);
  }
  for (; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    float in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint16_t out[8];
    std::memcpy(in, src + i, m * sizeof(float));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bfloat16_from_8_floats(_mm256_loadu_ps(in)));
    std::memcpy(dst + i, out, m * sizeof(uint16_t));
  }
}
#endif  // FASTSD_X86_KERNELS

void float_to(const float* src, c10::Half* dst, int64_t n) {
#ifdef FASTSD_X86_KERNELS
  if (cpu_has_avx2_f16c()) return float_to_half_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

void float_to(const float* src, c10::BFloat16* dst, int64_t n) {
#ifdef FASTSD_X86_KERNELS
  if (cpu_has_avx2_f16c()) return float_to_bfloat16_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) {
    // ATen's vectorised CPU conversion writes 0xFFFF for every NaN; do the same
    dst[i] = std::isnan(src[i]) ? c10::BFloat16(0xFFFF, c10::BFloat16::from_bits())
                                : static_cast<c10::BFloat16>(src[i]);
  }
}

constexpr int64_t kBlock = 256;  // elements staged in a stack buffer at a time

template <typename src_t, typename dst_t>
void convert_run(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(src_t));  // a plain copy keeps every bit, NaN payloads too
  } else if constexpr (std::is_same_v<src_t, float>) {
    float_to(src, dst, n);
  } else if constexpr (std::is_same_v<dst_t, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    // fp16 <-> bf16 and float64 -> 16 bit: through float32, as ATen converts (float64 is rounded
    // to float32 first, so the result equals Tensor.to() even where that rounds twice)
    float buf[kBlock];
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      for (int64_t k = 0; k < m; ++k) buf[k] = static_cast<float>(src[i + k]);
      float_to(buf, dst + i, m);
    }
  }
}

// Elements [begin, end) of one source, in its logical row-major order, to dst.
template <typename src_t, typename dst_t>
void pack_range(const PackItem& item, int64_t begin, int64_t end, dst_t* dst) {
  const src_t* src = static_cast<const src_t*>(item.src);
  if (item_is_contiguous(item)) {
    convert_run(src + begin, dst + begin, end - begin);
    return;
  }
  const int nd = item.ndim;
  int64_t index[kMaxDims];
  int64_t rest = begin;
  int64_t offset = 0;
  for (int d = nd - 1; d >= 0; --d) {
    index[d] = rest % item.sizes[d];
    rest /= item.sizes[d];
    offset += index[d] * item.strides[d];
  }
  const int64_t inner_size = item.sizes[nd - 1];
  const int64_t inner_stride = item.strides[nd - 1];
  src_t buf[kBlock];
  int64_t pos = begin;
  while (pos < end) {
    // gather along the innermost dim into buf, then convert the staged run
    const int64_t m = std::min({kBlock, end - pos, inner_size - index[nd - 1]});
    const src_t* p = src + offset;
    for (int64_t k = 0; k < m; ++k) buf[k] = p[k * inner_stride];
    convert_run(buf, dst + pos, m);
    pos += m;
    index[nd - 1] += m;
    offset += m * inner_stride;
    for (int d = nd - 1; d > 0 && index[d] == item.sizes[d]; --d) {  // carry to outer dims
      offset -= index[d] * item.strides[d];
      index[d] = 0;
      ++index[d - 1];
      offset += item.strides[d - 1];
    }
  }
}

template <typename dst_t>
void pack_item_range(const PackItem& item, int64_t begin, int64_t end, dst_t* dst) {
  dst_t* out = dst + item.dst_offset;
  switch (item.src_type) {
    case kSrcFloat: return pack_range<float>(item, begin, end, out);
    case kSrcHalf: return pack_range<c10::Half>(item, begin, end, out);
    case kSrcBFloat16: return pack_range<c10::BFloat16>(item, begin, end, out);
    case kSrcDouble: return pack_range<double>(item, begin, end, out);
  }
}

constexpr int64_t kPiece = 1 << 15;
struct Piece {
  int64_t item, begin, end;
};

template <typename dst_t>
void run_pieces(const std::vector<PackItem>& items, const std::vector<Piece>& pieces,
                int64_t total, dst_t* out) {
  auto work = [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      pack_item_range(items[pieces[p].item], pieces[p].begin, pieces[p].end, out);
    }
  };
  if (total < 4 * kPiece) {
    work(0, static_cast<int64_t>(pieces.size()));  // too little work to wake the thread pool
  } else {
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, work);
  }
}

void pack_tensors_cpu(at::TensorList srcs, const at::Tensor& dst, at::OptionalIntArrayRef offsets) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<PackItem> items = plan_pack(srcs, dst, offsets, keep_alive);

  // Equal-sized pieces of every source, spread over the threads: one flat work list, so that a
  // list of many small tensors parallelises as well as one big one.
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    total += items[i].numel;
    for (int64_t b = 0; b < items[i].numel; b += kPiece) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(b + kPiece, items[i].numel)});
    }
  }
  if (pieces.empty()) return;
  switch (dst.scalar_type()) {
    case at::kHalf: return run_pieces(items, pieces, total, dst.data_ptr<c10::Half>());
    case at::kBFloat16: return run_pieces(items, pieces, total, dst.data_ptr<c10::BFloat16>());
    default: return run_pieces(items, pieces, total, dst.data_ptr<float>());
  }
}

// The CUDA launch, block after block and thread after thread, on the CPU (see
// snapshot_pack_kernel.h). For tests: it is as slow as it sounds.
void pack_tensors_cuda_emulated(at::TensorList srcs, const at::Tensor& dst,
                                at::OptionalIntArrayRef offsets) {
  TORCH_CHECK(dst.device().is_cpu(), "fastsd::_pack_tensors_cuda_emulated runs on CPU tensors");
  std::vector<at::Tensor> keep_alive;
  const std::vector<PackItem> plan = plan_pack(srcs, dst, offsets, keep_alive);
  const PackTable table = build_pack_table(plan, /*pinned=*/false);
  const uint8_t* base = table.host.const_data_ptr<uint8_t>();
  const auto run = [&](auto* out) {
    using dst_t = std::remove_pointer_t<decltype(out)>;
    for (int64_t block = 0; block < table.num_blocks; ++block) {
      for (int thread = 0; thread < kThreads; ++thread) {
        pack_block<dst_t>(table.tasks(base), table.items(base), table.layouts(base), out, block,
                          thread, kThreads);
      }
    }
  };
  switch (dst.scalar_type()) {
    case at::kHalf: return run(dst.data_ptr<c10::Half>());
    case at::kBFloat16: return run(dst.data_ptr<c10::BFloat16>());
    default: return run(dst.data_ptr<float>());
  }
}

int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

}  // namespace

PackTable build_pack_table(const std::vector<PackItem>& plan, bool pinned) {
  PackTable table;
  int64_t num_layouts = 0;
  for (const PackItem& p : plan) {
    table.num_blocks += (p.numel + kChunk - 1) / kChunk;
    if (!item_is_contiguous(p)) ++num_layouts;
  }
  TORCH_CHECK(plan.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "fastsd::pack_tensors: too many sources for one launch (", plan.size(), ")");
  table.items_bytes = align_up(plan.size() * sizeof(DeviceItem), 64);
  table.layouts_bytes = align_up(num_layouts * sizeof(DeviceLayout), 64);
  const int64_t bytes = table.items_bytes + table.layouts_bytes +
                        table.num_blocks * static_cast<int64_t>(sizeof(BlockTask));
  table.host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(pinned));
  uint8_t* base = table.host.data_ptr<uint8_t>();
  auto* items = reinterpret_cast<DeviceItem*>(base);
  auto* layouts = reinterpret_cast<DeviceLayout*>(base + table.items_bytes);
  auto* tasks = reinterpret_cast<BlockTask*>(base + table.items_bytes + table.layouts_bytes);
  int32_t layout_index = 0;
  int64_t block = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const PackItem& p = plan[i];
    DeviceItem& d = items[i];
    d.src = p.src;
    d.dst_offset = p.dst_offset;
    d.numel = p.numel;
    d.src_type = p.src_type;
    d.layout = -1;
    if (!item_is_contiguous(p)) {
      DeviceLayout& l = layouts[layout_index];
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
      tasks[block++] = BlockTask{static_cast<int32_t>(i), static_cast<int32_t>(c)};
    }
  }
  return table;
}

}  // namespace snapshot
}  // namespace fastsd

TORCH_LIBRARY_FRAGMENT(fastsd, m) {
  m.def(
      "pack_tensors(Tensor[] srcs, Tensor(a!) dst, int[]? offsets=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // the CUDA kernel's code run on the CPU, one thread at a time: for tests (snapshot_pack_kernel.h)
  m.def("_pack_tensors_cuda_emulated(Tensor[] srcs, Tensor(a!) dst, int[]? offsets=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastsd, CPU, m) {
  m.impl("pack_tensors", &fastsd::snapshot::pack_tensors_cpu);
  m.impl("_pack_tensors_cuda_emulated", &fastsd::snapshot::pack_tensors_cuda_emulated);
}

// The ops have no derivative; torch's fallback refuses a write into a leaf that requires grad,
// as copy_ does (plan_pack moves dst's version).
TORCH_LIBRARY_IMPL(fastsd, Autograd, m) {
  m.impl("pack_tensors", torch::autograd::autogradNotImplementedFallback());
  m.impl("_pack_tensors_cuda_emulated", torch::autograd::autogradNotImplementedFallback());
}
