// op_profiler.cu -- OpProfiler (op_profiler.h): CUDA events around backend ops, summed per name.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "model/cuda/op_profiler.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

OpProfiler::~OpProfiler() {
    for (CUevent_st* e : pool_) cudaEventDestroy(e);
}

CUevent_st* OpProfiler::event() {
    if (pool_used_ == pool_.size()) {
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreate(&e));
        pool_.push_back(e);
    }
    return pool_[pool_used_++];
}

void OpProfiler::begin(const std::string& name) {
    if (depth_++ > 0) return;
    records_.push_back({name, event(), event()});
    CUDA_CHECK(cudaEventRecord(records_.back().start, stream_));
}

void OpProfiler::end() {
    if (--depth_ > 0) return;
    CUDA_CHECK(cudaEventRecord(records_.back().end, stream_));
}

std::string OpProfiler::report(int steps, const std::map<std::string, double>& roofline_seconds) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    struct Stat {
        long calls = 0;
        double gpu_ms = 0, idle_ms = 0;
    };
    std::map<std::string, Stat> stats;
    double gpu_total = 0, idle_total = 0;
    float wall = 0;
    for (size_t i = 0; i < records_.size(); ++i) {
        float gpu = 0, idle = 0;
        CUDA_CHECK(cudaEventElapsedTime(&gpu, records_[i].start, records_[i].end));
        if (i > 0) CUDA_CHECK(cudaEventElapsedTime(&idle, records_[i - 1].end, records_[i].start));
        Stat& s = stats[records_[i].name];
        s.calls += 1, s.gpu_ms += gpu, s.idle_ms += idle;
        gpu_total += gpu, idle_total += idle;
    }
    if (!records_.empty()) CUDA_CHECK(cudaEventElapsedTime(&wall, records_.front().start, records_.back().end));
    std::vector<std::pair<std::string, Stat>> rows(stats.begin(), stats.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
        return a.second.gpu_ms + a.second.idle_ms > b.second.gpu_ms + b.second.idle_ms;
    });
    const double per = steps > 0 ? 1.0 / steps : 1.0;
    std::string out;
    char line[256];
    std::snprintf(line, sizeof line,
                  "profile (per step, %d steps): first op start -> last op end %.2f ms = GPU busy %.2f ms + "
                  "GPU idle between ops %.2f ms\n",
                  steps, wall * per, gpu_total * per, idle_total * per);
    out += line;
    const bool roofline = !roofline_seconds.empty();
    if (roofline) {
        double total = 0;
        for (const auto& [name, seconds] : roofline_seconds) total += seconds;
        std::snprintf(line, sizeof line,
                      "roofline (model/op_cost_backend.h, bench_roofline): %.2f ms per step; GPU busy is %.2fx it\n",
                      total * 1e3, total > 0 ? gpu_total * per / (total * 1e3) : 0.0);
        out += line;
    }
    std::snprintf(line, sizeof line, "%-44s %7s %10s %10s %6s%s\n", "op", "calls", "GPU ms", "idle ms", "share",
                  roofline ? " roofline ms  x roofline" : "");
    out += line;
    for (const auto& [name, s] : rows) {
        std::snprintf(line, sizeof line, "%-44s %7.0f %10.3f %10.3f %5.1f%%", name.c_str(), s.calls * per,
                      s.gpu_ms * per, s.idle_ms * per, wall > 0 ? 100.0 * (s.gpu_ms + s.idle_ms) / wall : 0.0);
        out += line;
        if (roofline) {
            const auto it = roofline_seconds.find(name);
            if (it != roofline_seconds.end() && it->second > 0) {
                std::snprintf(line, sizeof line, " %11.3f %10.1fx", it->second * 1e3,
                              s.gpu_ms * per / (it->second * 1e3));
            } else {
                std::snprintf(line, sizeof line, " %11s %11s", "-", "-");
            }
            out += line;
        }
        out += "\n";
    }
    records_.clear();
    pool_used_ = 0;
    return out;
}

ProfiledOp::ProfiledOp(OpProfiler* p, const char* name, long a, long b, long c)
    : p_(p != nullptr && p->enabled() ? p : nullptr) {
    if (p_ == nullptr) return;
    char full[128];
    std::snprintf(full, sizeof full, "%s %ldx%ldx%ld", name, a, b, c);
    p_->begin(full);
}

}  // namespace bmoe::model
