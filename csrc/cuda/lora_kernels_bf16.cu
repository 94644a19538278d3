// The __nv_bfloat16 instantiations of the lora_ensemble kernels (one translation unit per dtype, so that
// MAX_JOBS builds them in parallel).
#include "fused_lora_gemm.cuh"
#include "lora_grads.cuh"

namespace lora_ensemble {

template void launch_fused_lora_gemm<__nv_bfloat16>(const FusedLoraGemmParams<__nv_bfloat16>&, bool, cudaStream_t);
template void launch_lora_grads<__nv_bfloat16>(const LoraGradParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace lora_ensemble
