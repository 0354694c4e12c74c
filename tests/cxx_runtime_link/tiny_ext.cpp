// A one-function Python extension whose only C++ runtime use is ostream number formatting, the
// code path that crashed on the H100 machine: enough to see which libstdc++ a link binds.
#include <Python.h>

#include <sstream>
#include <string>

static PyObject* describe(PyObject*, PyObject* arg) {
  std::ostringstream message;
  message << "got " << PyLong_AsLong(arg) << " and " << 1.5;
  const std::string text = message.str();
  return PyUnicode_FromString(text.c_str());
}

static PyMethodDef methods[] = {{"describe", describe, METH_O, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "tiny_ext", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_tiny_ext(void) { return PyModule_Create(&module_def); }
