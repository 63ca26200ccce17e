// op_profiler.h -- where a CUDA training step spends its time, op by op (bench_train --profile).
//
// Each profiled backend op records a CUDA event before and after its launches on the compute
// stream. At report(), per op name: calls, GPU time (start -> end) and the GPU idle time just
// before it (previous op's end -> this start: the host was busy, e.g. routing math or a
// download's synchronisation). Off by default; a disabled profiler costs one branch per op.
// Plain-C++ header (events held as opaque pointers) so g++-compiled code can include it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

struct CUstream_st;
struct CUevent_st;

namespace bmoe::model {

class OpProfiler {
  public:
    explicit OpProfiler(CUstream_st* stream) : stream_(stream) {}
    ~OpProfiler();
    OpProfiler(const OpProfiler&) = delete;
    OpProfiler& operator=(const OpProfiler&) = delete;

    void set_enabled(bool on) { enabled_ = on; }
    bool enabled() const { return enabled_; }
    // Nested ops (an op calling another) count once, under the outermost name.
    void begin(const std::string& name);
    void end();
    // Synchronises, then a table sorted by GPU + idle time, per `steps` (the profiled steps), and
    // forgets the records. With roofline_seconds (per step, by op name: OpCostBackend's
    // seconds_by_profiled_op()), two more columns: the op's roofline time and GPU time over it.
    std::string report(int steps, const std::map<std::string, double>& roofline_seconds = {});

  private:
    struct Record {
        std::string name;
        CUevent_st* start;
        CUevent_st* end;
    };
    CUevent_st* event();  // from the pool, created on first use
    CUstream_st* stream_;
    bool enabled_ = false;
    int depth_ = 0;
    std::vector<Record> records_;
    std::vector<CUevent_st*> pool_;
    size_t pool_used_ = 0;
};

// RAII scope around one op's launches; a no-op when the profiler is null or disabled.
class ProfiledOp {
  public:
    ProfiledOp(OpProfiler* p, const char* name) : p_(p != nullptr && p->enabled() ? p : nullptr) {
        if (p_ != nullptr) p_->begin(name);
    }
    // Name with a shape, e.g. "matmul_fwd 8192x768x3072": only built when profiling.
    ProfiledOp(OpProfiler* p, const char* name, long a, long b, long c);
    ~ProfiledOp() {
        if (p_ != nullptr) p_->end();
    }
    ProfiledOp(const ProfiledOp&) = delete;
    ProfiledOp& operator=(const ProfiledOp&) = delete;

  private:
    OpProfiler* p_;
};

}  // namespace bmoe::model
