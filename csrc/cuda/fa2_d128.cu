// The fa2 kernels of head dim 128 (fa2_launch.cuh): one file per head dim, compiled in parallel.
#include "fa2_launch.cuh"

namespace qkv::cuda::fa2 {
template void launch_forward_for_dim<128>(const ForwardArgs&, TileName, cudaStream_t);
template void launch_backward_for_dim<128>(const BackwardArgs&, TileName, cudaStream_t);
}  // namespace qkv::cuda::fa2
