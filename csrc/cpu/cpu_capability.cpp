// The choice of the CPU kernels' instruction set (cpu_capability.h). Baseline build.
#include "cpu_capability.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qkv {
namespace {

constexpr const char* kNames[kCpuCapabilityCount] = {"default", "avx2", "avx512", "amx"};

std::atomic<bool> amx_emulation{false};

// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), and Linux's permission for this
// process to use the tile data state (XFEATURE_XTILEDATA, 18), asked once: without it the first
// tile instruction faults.
bool amx_usable() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

// AVX512-BF16 (CPUID leaf 7 subleaf 1, EAX bit 5) beside AVX-512F (whose register state the
// operating system then saves).
bool avx512_bf16_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool supported = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return false;
#if defined(__linux__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5));
#else
    return false;
#endif
  }();
  return supported;
#else
  return false;
#endif
}

std::atomic<bool>& native_bf16_rounding() {
  static std::atomic<bool> on{avx512_bf16_supported()};
  return on;
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

// The process-wide choice, made on first use. Relaxed atomics: a test that switches copies
// does so between calls, never during one.
std::atomic<int>& active() {
  static std::atomic<int> capability = [] {
    const char* env = std::getenv("QKV_CPU_CAPABILITY");
    const CpuCapabilityChoice choice = choose_cpu_capability(env == nullptr ? "" : env, best_supported_cpu_capability());
    if (!choice.warning.empty()) TORCH_WARN(choice.warning);
    return static_cast<int>(choice.capability);
  }();
  return capability;
}

}  // namespace

const char* cpu_capability_name(CpuCapability capability) { return kNames[static_cast<int>(capability)]; }

CpuCapability best_supported_cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports also checks that the operating system saves the wider registers.
  // The AVX2 copy is built with -mf16c too: every CPU with AVX2 and FMA has F16C.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && (amx_emulation.load(std::memory_order_relaxed) || amx_usable())) return CpuCapability::Amx;
  if (avx512) return CpuCapability::Avx512;
  if (avx2) return CpuCapability::Avx2;
#endif
  return CpuCapability::Default;
}

CpuCapabilityChoice choose_cpu_capability(std::string_view requested, CpuCapability best) {
  const std::string value = lower(requested);
  if (value.empty()) return {std::min(best, kAutomaticCpuCapabilityLimit), ""};
  const auto* it = std::find(std::begin(kNames), std::end(kNames), value);
  TORCH_CHECK(it != std::end(kNames), "QKV_CPU_CAPABILITY='", requested,
              "' names no CPU capability; expected one of default, avx2, avx512, amx (or unset: the best this CPU supports)");
  const auto wanted = static_cast<CpuCapability>(it - std::begin(kNames));
  if (wanted > best) {
    return {best, "QKV_CPU_CAPABILITY=" + value + ": this CPU does not support " + value + "; using " +
                      std::string(cpu_capability_name(best))};
  }
  return {wanted, ""};
}

AmxTileMode amx_tile_mode() {
  if (cpu_capability() != CpuCapability::Amx) return AmxTileMode::Off;
  return amx_emulation.load(std::memory_order_relaxed) ? AmxTileMode::Emulated : AmxTileMode::Hardware;
}

bool set_amx_emulation(bool on) {
  const bool previous = amx_emulation.exchange(on, std::memory_order_relaxed);
  // Leaving emulation on a CPU without AMX: the amx capability is no longer supported.
  if (!on && cpu_capability() > best_supported_cpu_capability()) set_cpu_capability(best_supported_cpu_capability());
  return previous;
}

bool bf16_native_rounding() { return native_bf16_rounding().load(std::memory_order_relaxed); }

bool set_bf16_native_rounding(bool on) {
  return native_bf16_rounding().exchange(on && avx512_bf16_supported(), std::memory_order_relaxed);
}

CpuCapability cpu_capability() { return static_cast<CpuCapability>(active().load(std::memory_order_relaxed)); }

CpuCapability set_cpu_capability(CpuCapability capability) {
  TORCH_CHECK(capability <= best_supported_cpu_capability(), "qkv: this CPU cannot run the ",
              cpu_capability_name(capability), " kernels (it supports up to ",
              cpu_capability_name(best_supported_cpu_capability()), ")");
  return static_cast<CpuCapability>(active().exchange(static_cast<int>(capability), std::memory_order_relaxed));
}

}  // namespace qkv
