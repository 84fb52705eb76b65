#include <chrono>

#include "driver.h"

namespace kt {
namespace {
// Written only under the runtime lock (engine calls are serialised).
double g_stage_ms[KT_STAGE_COUNT] = {};

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

StageTimer::StageTimer(int stage) : stage_(stage), start_(now_ms()) {}
StageTimer::~StageTimer() { g_stage_ms[stage_] += now_ms() - start_; }

void profile_read(double *ms, bool reset) {
    for (int i = 0; i < KT_STAGE_COUNT; ++i) {
        if (ms) ms[i] = g_stage_ms[i];
        if (reset) g_stage_ms[i] = 0.0;
    }
}

}  // namespace kt
