// BF16 <-> FP32 scalar conversions shared by every path.
//
// Internal linkage (an anonymous namespace), so that each ISA file gets its own copy compiled
// with its own flags: with an external inline function the linker keeps one copy for the whole
// library, which could be one compiled for AVX-512 and then run on an AVX2 CPU.
#pragma once

#include <cstdint>
#include <cstring>

namespace kt {
namespace {

inline float bf16_to_float(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest even; NaN stays a (quiet) NaN. Written as a select rather than an early
// return so that row loops calling it (act.inc) vectorise.
inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

}  // namespace
}  // namespace kt
