// The __half instantiations of the lora_ensemble kernels (one translation unit per dtype, so that
// MAX_JOBS builds them in parallel).
#include "fused_lora_gemm.cuh"
#include "lora_grads.cuh"

namespace lora_ensemble {

template void launch_fused_lora_gemm<__half>(const FusedLoraGemmParams<__half>&, bool, cudaStream_t);
template void launch_lora_grads<__half>(const LoraGradParams<__half>&, cudaStream_t);

}  // namespace lora_ensemble
