// comm_bench.h -- `bmoe comm-bench`: the communicator bandwidth self-test (nccl-tests style), run
// with the same launcher, backend and communicator choice as training, before a long job.
//
// For each message size (bytes per rank, doubling from min to max) and each collective the data
// path uses -- all_reduce_sum (gradients) and all_to_all_v with equal blocks (token exchange) --
// it first checks one call's result element by element (a corrupting link or misconfigured NCCL
// fails loudly, on every rank alike), then times `iters` calls after `warmup`, slowest rank wins:
//   algbw = bytes / time;  busbw = algbw * 2(P-1)/P (all-reduce), algbw * (P-1)/P (all-to-all)
// (busbw is comparable to the link's peak whatever the rank count, as in nccl-tests).
#pragma once

#include <cstddef>
#include <iosfwd>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace bmoe::trainer {

struct CommBenchOptions {
    std::string backend = "cpu";  // where the buffers live: cpu | cuda
    std::string comm = "auto";    // auto | mpi | nccl (as --parallel.comm)
    size_t min_bytes = 1 << 10;   // per rank
    size_t max_bytes = 64 << 20;
    int iters = 20;
    int warmup = 5;
};

struct CommBenchRow {
    std::string op;  // "all_reduce" | "all_to_all"
    size_t bytes = 0;
    double seconds = 0.0;  // per call, slowest rank
    double algbw_gbs = 0.0, busbw_gbs = 0.0;
};

// Collective over `world` (a host communicator: MPI, or LocalComm for one process). Prints the
// table on rank 0 to `log`. Throws a one-line bmoe::Error when a result is wrong or an option is
// invalid.
std::vector<CommBenchRow> run_comm_bench(const CommBenchOptions& options,
                                         parallel::Communicator& world,
                                         std::ostream& log);

}  // namespace bmoe::trainer
