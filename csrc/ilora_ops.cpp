// Op schemas of the compiled extension and the Python module that loads them.
//
// The CPU implementation lives in cpu/ilora_cpu.cpp and the CUDA one in cuda/ilora_cuda.cu; both register
// against these schemas with TORCH_LIBRARY_IMPL. Fake (meta) implementations and autograd are attached from
// Python (ilora_kernels/functional.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "op_schemas.h"

TORCH_LIBRARY(ilora_kernels, m) {
  m.def(ilora::kFusedForwardSchema);
  m.def(ilora::kFusedBackwardSchema);
}

namespace {

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(ILORA_TORCH_VERSION); }

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef ILORA_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"torch_version", torch_version, METH_NOARGS, "The torch version this extension was built against."},
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ilora_kernels compiled ops (registered on import).", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
