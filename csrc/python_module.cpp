// The Python extension module qkv._C. It holds no functions: importing it loads the shared
// library, whose static initialisers register the torch.ops.qkv operators.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
