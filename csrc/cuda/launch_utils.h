#pragma once
// Host-side launch helpers of the kernel launchers (*.cu): shared-memory limits read from the
// device, grid-size checks. Uses c10 for errors; the kernel headers themselves stay torch-free.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

namespace qkv::cuda {

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KB,
// after checking the device allows it (limits are read from the device, never assumed).
template <typename Kernel>
void prepare_dynamic_smem(Kernel kernel, size_t bytes, const char* what) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "qkv: the CUDA kernel ", what, " needs ", bytes,
              " bytes of shared memory for this head_dim/dtype, but device ", device, " allows only ", optin,
              " per block");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Grids are 1-D over (batch * heads * tiles): gridDim.x allows 2^31 - 1 blocks, y and z only 65535.
inline unsigned grid_size_checked(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= 0x7fffffffLL, "qkv: the CUDA kernel ", what, " would need ", blocks,
              " thread blocks, more than the 2^31 - 1 a grid allows; split the batch");
  return static_cast<unsigned>(blocks);
}

}  // namespace qkv::cuda
