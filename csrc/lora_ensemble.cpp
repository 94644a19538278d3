// Schemas of the CUDA C++ ops of lora_ensemble, and the module stub that lets Python import the .so.
//
// The ops follow the backend contract of lora_ensemble/backends.py (N members, M rows per member,
// d in, k out, r rank; all tensors contiguous and of one dtype; s = scaling):
//   cuda_forward:       x [N,M,d] (shared: [M,d]) -> out = x W0^T + b + base + s (x A^T) B^T  [N,M,k]
//                       (W0, b and base [N,M,k] (shared: [M,k]) each optional),
//                       xa = x A^T [N,M,r] fp32
//   cuda_backward_dx:   dy [N,M,k] -> dx = dy W0 (W0 optional) + s (dy B) A  [N,M,d] (shared: summed, [M,d]),
//                       dyb = dy B [N,M,r] fp32
//   cuda_backward_lora: -> dA = s dyb^T x [N,r,d], dB = s dy^T xa [N,k,r]
// Their CUDA kernels register under TORCH_LIBRARY_IMPL(lora_ensemble, CUDA, m) in csrc/cuda/;
// fake (meta) impls and autograd live in Python.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lora_ensemble._C` loads this library, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// A fragment: the Python side registers lora_ensemble::fused_linear in the same namespace.
TORCH_LIBRARY_FRAGMENT(lora_ensemble, m) {
  m.def("cuda_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
        "float scaling, bool shared_input) -> (Tensor, Tensor)");
  m.def("cuda_backward_dx(Tensor grad_out, Tensor? weight, Tensor lora_A, Tensor lora_B, "
        "float scaling, bool shared_input) -> (Tensor, Tensor)");
  m.def("cuda_backward_lora(Tensor grad_out, Tensor x, Tensor xa, Tensor dyb, "
        "float scaling, bool shared_input) -> (Tensor, Tensor)");
}
