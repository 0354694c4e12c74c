// The fa2 kernels as seen by attention_cuda.cpp: qualification tests, the tile chosen through
// QKV_FA2_FORWARD_TILE / QKV_FA2_BACKWARD_TILE, and the head-dim switch to fa2_d*.cu.
#include "fa2_tiles.cuh"
#include "launch_utils.h"

#include <cstdlib>

namespace qkv::cuda {
namespace fa2 {

// Defined in fa2_launch.cuh and instantiated for D = 64, 96, 128, 256 in fa2_d<D>.cu.
template <int D>
void launch_forward_for_dim(const ForwardArgs& args, TileName name, cudaStream_t stream);
template <int D>
void launch_backward_for_dim(const BackwardArgs& args, TileName name, cudaStream_t stream);

namespace {

TileName tile_from_environment(const char* variable) {
  TileName name;
  const char* text = std::getenv(variable);
  TORCH_CHECK(parse_tile_name(text, name), "qkv: the environment variable ", variable,
              " must name a tile as <query rows>x<keys>x<warps>, e.g. 128x64x4; got '", text, "'");
  return name;
}

}  // namespace
}  // namespace fa2

bool fa2_forward_supported(const ForwardArgs& args, int device_major) {
  return fa2::forward_supported(args, device_major);
}

bool fa2_backward_supported(const BackwardArgs& args, int device_major) {
  return fa2::backward_supported(args, device_major);
}

int64_t fa2_backward_semaphores(const ProblemShape& shape) { return fa2::semaphore_count(shape); }

void launch_fa2_forward(const ForwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads * p.q_len == 0) return;
  TORCH_CHECK(fa2::forward_supported(args, 8), "qkv: internal error: the fa2 forward got a call it does not support");
  const fa2::TileName tile = fa2::tile_from_environment("QKV_FA2_FORWARD_TILE");
  switch (p.head_dim) {
    case 64: return fa2::launch_forward_for_dim<64>(args, tile, stream);
    case 96: return fa2::launch_forward_for_dim<96>(args, tile, stream);
    case 128: return fa2::launch_forward_for_dim<128>(args, tile, stream);
    default: return fa2::launch_forward_for_dim<256>(args, tile, stream);
  }
}

void launch_fa2_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads == 0) return;
  TORCH_CHECK(fa2::backward_supported(args, 8) && args.dq_accum != nullptr,
              "qkv: internal error: the fa2 backward got a call it does not support");
  const fa2::TileName tile = fa2::tile_from_environment("QKV_FA2_BACKWARD_TILE");
  switch (p.head_dim) {
    case 64: return fa2::launch_backward_for_dim<64>(args, tile, stream);
    case 96: return fa2::launch_backward_for_dim<96>(args, tile, stream);
    case 128: return fa2::launch_backward_for_dim<128>(args, tile, stream);
    default: return fa2::launch_backward_for_dim<256>(args, tile, stream);
  }
}

}  // namespace qkv::cuda
