// fastsd::pack_tensors on CUDA: the whole list in one kernel launch, on the current stream.
//
// The kernel body and the table it reads are in snapshot_pack_kernel.h (shared with the CPU
// emulation that the tests run); this file copies the table to the device and launches. Chunks of
// kChunk elements are small enough that a list of hundreds of tensors of very different sizes
// keeps every SM busy.
#include "snapshot_pack_kernel.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace fastsd {
namespace snapshot {
namespace {

template <typename dst_t>
__global__ void __launch_bounds__(kThreads)
pack_tensors_kernel(const BlockTask* __restrict__ tasks, const DeviceItem* __restrict__ items,
                    const DeviceLayout* __restrict__ layouts, dst_t* __restrict__ dst) {
  pack_block<dst_t>(tasks, items, layouts, dst, blockIdx.x, threadIdx.x, blockDim.x);
}

void pack_tensors_cuda(at::TensorList srcs, const at::Tensor& dst,
                       at::OptionalIntArrayRef offsets) {
  // The dispatcher comes here when any tensor is on CUDA; a guard on a CPU dst would fail with
  // a message about guard implementations that names neither the argument nor the fix.
  TORCH_CHECK(dst.is_cuda(), "fastsd::pack_tensors: the sources are on CUDA but dst is on ",
              dst.device(), ": allocate dst on the sources' GPU (or copy the sources to ",
              dst.device(), " first)");
  // The destination's device first: the temporaries and the pinned table below belong to it.
  const c10::cuda::CUDAGuard guard(dst.device());
  // The table reaches the device by a copy from a pinned host block that is recycled once the
  // copy completes: a CUDA graph replaying the launch would read a block reused since.
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "fastsd::pack_tensors cannot be captured in a CUDA graph: call "
              "SnapshotStore.capture outside torch.cuda.graph / reduce-overhead regions");
  std::vector<at::Tensor> keep_alive;
  const std::vector<PackItem> plan = plan_pack(srcs, dst, offsets, keep_alive);
  const PackTable table = build_pack_table(plan, /*pinned=*/true);
  if (table.num_blocks == 0) return;
  TORCH_CHECK(table.num_blocks <= std::numeric_limits<int32_t>::max(),
              "fastsd::pack_tensors: too many elements for one launch (", table.num_blocks,
              " chunks of ", kChunk, ")");

  // non_blocking from pinned memory: the copy is queued on the current stream and the caching
  // host allocator keeps the pinned block until it has completed.
  const at::Tensor on_device = table.host.to(dst.device(), at::kByte, /*non_blocking=*/true);
  const uint8_t* base = on_device.const_data_ptr<uint8_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(table.num_blocks));
  const auto launch = [&](auto* out) {
    using dst_t = std::remove_pointer_t<decltype(out)>;
    pack_tensors_kernel<dst_t><<<grid, kThreads, 0, stream>>>(
        table.tasks(base), table.items(base), table.layouts(base), out);
  };
  switch (dst.scalar_type()) {
    case at::kHalf: launch(dst.data_ptr<c10::Half>()); break;
    case at::kBFloat16: launch(dst.data_ptr<c10::BFloat16>()); break;
    default: launch(dst.data_ptr<float>()); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `on_device` and `keep_alive` may be freed now: the caching allocator reuses their memory
  // only for work queued later on this stream, i.e. after the kernel.
}

}  // namespace
}  // namespace snapshot
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd, CUDA, m) {
  m.impl("pack_tensors", &fastsd::snapshot::pack_tensors_cuda);
}
