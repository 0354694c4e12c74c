#pragma once
// Run-time choice of the CPU kernels' instruction set, in the manner of ATen's DispatchStub.
//
// The CPU kernel translation units (group cpu_kernel of the build) are compiled once per
// instruction set, each copy with its own flags and -DCPU_CAPABILITY=<NAME>, which puts all
// of its code in the inline namespace qkv::<NAME> (and ATen's vector types in
// at::vec::<NAME>), so no two copies share an inline function. Each copy registers its kernels
// into a CpuKernel slot at load time; a call runs the copy of the active capability: the best
// this CPU supports up to avx512, unless QKV_CPU_CAPABILITY=default|avx2|avx512|amx asks for
// another (amx: the AVX-512 copy with AMX tile products for bfloat16; opt-in, see below).
// Everything else is built for the baseline of the architecture (plain x86-64), so the
// library loads on any CPU. See docs/cpu-kernels.md.
//
// This header is part of the baseline build: no instruction-set code here.
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <string>
#include <string_view>
#include <utility>

namespace qkv {

// In increasing order: a copy may run wherever a higher one may.
// Amx has no copy of its own: it runs the AVX-512 copy (CpuKernel::get falls back to it), whose
// kernels ask amx_tile_mode() whether to take AMX tile products.
enum class CpuCapability : int { Default = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };
constexpr int kCpuCapabilityCount = 4;

// "default", "avx2", "avx512", "amx": the values of QKV_CPU_CAPABILITY.
const char* cpu_capability_name(CpuCapability capability);

// The best capability this CPU (and its operating system) supports. Default off x86-64. Amx
// needs AMX-TILE, AMX-BF16 and the kernel's permission to use the tile data (arch_prctl).
CpuCapability best_supported_cpu_capability();

// What an unset QKV_CPU_CAPABILITY may choose at most. The AMX path has never run on an AMX CPU
// (it is tested through AmxEmulated only), so it stays opt-in until tests/test_cpu_amx.py and a
// benchmark have passed on one.
constexpr CpuCapability kAutomaticCpuCapabilityLimit = CpuCapability::Avx512;

// How the AVX-512 copy's bfloat16 tile products run: Off (AVX-512 micro-kernels; the active
// capability is not amx), Hardware (AMX instructions), or Emulated (the same code on a software
// tile register file; tests on CPUs without AMX, through set_amx_emulation).
enum class AmxTileMode : int { Off = 0, Hardware = 1, Emulated = 2 };
AmxTileMode amx_tile_mode();
// Tests: with `on`, amx is supported on any AVX-512 CPU and runs emulated. Returns the previous
// setting.
bool set_amx_emulation(bool on);

// How the AMX path rounds float32 to bfloat16: with VCVTNEPS2BF16 (AVX512-BF16, which every AMX
// CPU has: one instruction where AVX-512F takes eight) or with AVX-512F integer arithmetic. Both
// round to nearest even and keep NaN a quiet NaN; they differ only on float32 denormals, which
// the instruction flushes to zero (as AMX's products flush bfloat16 denormals). On where the CPU
// has AVX512-BF16.
bool bf16_native_rounding();
// Tests: switch it off, or back on where the CPU has it (else it stays off). Returns the previous
// setting.
bool set_bf16_native_rounding(bool on);

// What QKV_CPU_CAPABILITY=`requested` selects on a CPU whose best capability is `best`, and
// the warning to give when the request is refused (empty if none). "" means "the best".
// Throws c10::Error (a RuntimeError in Python) for a value that names no capability.
struct CpuCapabilityChoice {
  CpuCapability capability;
  std::string warning;
};
CpuCapabilityChoice choose_cpu_capability(std::string_view requested, CpuCapability best);

// The active capability. The first call chooses it from QKV_CPU_CAPABILITY and this CPU
// (warning once, through TORCH_WARN, when the variable asks for one the CPU lacks).
CpuCapability cpu_capability();

// Makes `capability` the active one for the whole process (tests and benchmarks compare the
// copies in one process). Throws if this CPU cannot run it; returns the previous one.
CpuCapability set_cpu_capability(CpuCapability capability);

// One kernel's copies, one slot per capability: a table of function pointers that the
// kernel translation units fill in at load time (QKV_REGISTER_CPU_KERNEL). Constant-
// initialised, so registration from any translation unit's static initialisers is safe.
template <typename Fn>
class CpuKernel {
 public:
  constexpr explicit CpuKernel(const char* name) : name_(name) {}

  void set(CpuCapability capability, Fn* fn) { fns_[static_cast<int>(capability)] = fn; }

  // The copy for the active capability, or the best one built below it (a build for
  // aarch64 has only the default copy).
  Fn* get() const {
    for (int c = static_cast<int>(cpu_capability()); c >= 0; --c) {
      if (fns_[c] != nullptr) return fns_[c];
    }
    TORCH_CHECK(false, "qkv: no CPU kernel was built for ", name_);
  }

  template <typename... Args>
  decltype(auto) operator()(Args&&... args) const {
    return get()(std::forward<Args>(args)...);
  }

 private:
  const char* name_;
  std::array<Fn*, kCpuCapabilityCount> fns_{};
};

}  // namespace qkv

// In a kernel translation unit: the capability this copy is compiled for.
// (The AVX-512 copy serves amx too.)
#if defined(CPU_CAPABILITY_AVX512)
#define QKV_COMPILED_CPU_CAPABILITY ::qkv::CpuCapability::Avx512
#elif defined(CPU_CAPABILITY_AVX2)
#define QKV_COMPILED_CPU_CAPABILITY ::qkv::CpuCapability::Avx2
#elif defined(CPU_CAPABILITY_DEFAULT)
#define QKV_COMPILED_CPU_CAPABILITY ::qkv::CpuCapability::Default
#endif

// Registers this copy's `fn` into the CpuKernel `kernel` (at load time). Only in kernel
// translation units: elsewhere QKV_COMPILED_CPU_CAPABILITY is undefined and this fails to compile.
#define QKV_REGISTER_CPU_KERNEL(kernel, fn)                     \
  [[maybe_unused]] static const bool kernel##_registered_here = \
      ((kernel).set(QKV_COMPILED_CPU_CAPABILITY, &(fn)), true)
