// The Python module fastsd._C. Its ops are registered with TORCH_LIBRARY_FRAGMENT(fastsd, ...) in
// the other files of csrc/ and are reached as torch.ops.fastsd.*; this file only makes the shared
// library importable and says how it was built.
#include <torch/extension.h>

namespace {
bool built_with_cuda() {
#ifdef FASTSD_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsd C++/CUDA ops (registered under torch.ops.fastsd)";
  m.def("built_with_cuda", &built_with_cuda,
        "True when the extension was compiled with its CUDA kernels.");
}
