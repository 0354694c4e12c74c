// The Python extension module qkv._C. Importing it loads the shared library, whose static
// initialisers register the torch.ops.qkv operators. Its functions are private: which copy
// of the CPU kernels runs (cpu/cpu_capability.h), for qkv's import, tests and benchmarks.
#include <Python.h>
#include <torch/csrc/Exceptions.h>

#include "cpu/cpu_capability.h"

#include <string>

namespace {

qkv::CpuCapability parse_capability(const char* name) {
  const qkv::CpuCapabilityChoice choice = qkv::choose_cpu_capability(name, qkv::CpuCapability::Amx);
  TORCH_CHECK(choice.warning.empty() && *name != '\0', "qkv: '", name,
              "' names no CPU capability; expected one of default, avx2, avx512, amx");
  return choice.capability;
}

// _cpu_capability() -> str: the active capability; the first call chooses it (errors and
// warnings about QKV_CPU_CAPABILITY surface here, as a RuntimeError or a UserWarning).
PyObject* cpu_capability(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(qkv::cpu_capability_name(qkv::cpu_capability()));
  END_HANDLE_TH_ERRORS
}

// _set_cpu_capability(name) -> str: switches every CPU kernel to that copy; returns the previous one.
PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyUnicode_FromString(qkv::cpu_capability_name(qkv::set_cpu_capability(parse_capability(name))));
  END_HANDLE_TH_ERRORS
}

// _supported_cpu_capabilities() -> list[str]: every copy this CPU can run, lowest first.
PyObject* supported_cpu_capabilities(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  const int best = static_cast<int>(qkv::best_supported_cpu_capability());
  PyObject* names = PyList_New(best + 1);
  for (int c = 0; c <= best; ++c) {
    PyList_SET_ITEM(names, c, PyUnicode_FromString(qkv::cpu_capability_name(static_cast<qkv::CpuCapability>(c))));
  }
  return names;
  END_HANDLE_TH_ERRORS
}

// _choose_cpu_capability(requested, best) -> (str, str): what QKV_CPU_CAPABILITY=requested
// would select on a CPU whose best capability is `best`, and the warning it would give.
PyObject* choose_cpu_capability(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* requested = nullptr;
  const char* best = nullptr;
  if (!PyArg_ParseTuple(args, "ss", &requested, &best)) return nullptr;
  const qkv::CpuCapabilityChoice choice = qkv::choose_cpu_capability(requested, parse_capability(best));
  return Py_BuildValue("(ss)", qkv::cpu_capability_name(choice.capability), choice.warning.c_str());
  END_HANDLE_TH_ERRORS
}

// A test switch taking any object Python can read as true or false: `set(on)`, and its previous
// setting as a bool.
PyObject* switch_setting(PyObject* arg, bool (*set)(bool)) {
  HANDLE_TH_ERRORS
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(set(on != 0));
  END_HANDLE_TH_ERRORS
}

// _set_amx_emulation(on) -> bool: tests only. While on, the amx capability is supported on any
// AVX-512 CPU and its tile products run on a software register file (amx_tiles.h's
// AmxEmulated); returns the previous setting.
PyObject* set_amx_emulation(PyObject*, PyObject* arg) { return switch_setting(arg, qkv::set_amx_emulation); }

// _amx_tile_mode() -> str: "off", "hardware" or "emulated" (cpu_capability.h's AmxTileMode).
PyObject* amx_tile_mode(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  constexpr const char* kModes[] = {"off", "hardware", "emulated"};
  return PyUnicode_FromString(kModes[static_cast<int>(qkv::amx_tile_mode())]);
  END_HANDLE_TH_ERRORS
}

// _set_bf16_native_rounding(on) -> bool: tests only (cpu_capability.h's set_bf16_native_rounding);
// _bf16_native_rounding() -> bool: whether the AMX path rounds with VCVTNEPS2BF16 now.
PyObject* set_bf16_native_rounding(PyObject*, PyObject* arg) {
  return switch_setting(arg, qkv::set_bf16_native_rounding);
}

PyObject* bf16_native_rounding(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyBool_FromLong(qkv::bf16_native_rounding());
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_cpu_capability", cpu_capability, METH_NOARGS, "The active copy of the CPU kernels."},
    {"_set_cpu_capability", set_cpu_capability, METH_O, "Switch the CPU kernels to another copy (tests)."},
    {"_supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS, "The copies this CPU can run."},
    {"_choose_cpu_capability", choose_cpu_capability, METH_VARARGS, "What QKV_CPU_CAPABILITY would select."},
    {"_set_amx_emulation", set_amx_emulation, METH_O, "Emulate the AMX tile products (tests)."},
    {"_amx_tile_mode", amx_tile_mode, METH_NOARGS, "How bfloat16 tile products run now."},
    {"_set_bf16_native_rounding", set_bf16_native_rounding, METH_O, "Round with VCVTNEPS2BF16 where supported (tests)."},
    {"_bf16_native_rounding", bf16_native_rounding, METH_NOARGS, "Whether the AMX path rounds with VCVTNEPS2BF16."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
