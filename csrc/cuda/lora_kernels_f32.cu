// The float instantiations of the lora_ensemble kernels (one translation unit per dtype, so that
// MAX_JOBS builds them in parallel).
#include "fused_lora_gemm.cuh"
#include "lora_grads.cuh"

namespace lora_ensemble {

template void launch_fused_lora_gemm<float>(const FusedLoraGemmParams<float>&, bool, cudaStream_t);
template void launch_lora_grads<float>(const LoraGradParams<float>&, cudaStream_t);

}  // namespace lora_ensemble
