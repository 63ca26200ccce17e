#include "trainer/comm_bench.h"

#include <chrono>
#include <cstdio>
#include <ostream>

#include "model/backend.h"
#include "model/buffer.h"
#include "parallel/check.h"
#include "parallel/mpi_env.h"
#include "parallel/process_grid.h"
#include "trainer/data_comm.h"

namespace bmoe::trainer {

namespace {

using Clock = std::chrono::steady_clock;

// Values exact in float: rank r's all-reduce input i is (r + 1) * (i % 7 + 1); its all-to-all block
// for peer p holds (r * P + p) * 1024 + (j % 1024) at position j (P <= 128 keeps it below 2^24).
float reduce_input(int rank, size_t i) { return static_cast<float>((rank + 1) * static_cast<int>(i % 7 + 1)); }
float block_value(int src, int dst, int P, size_t j) {
    return static_cast<float>((src * P + dst) * 1024 + static_cast<int>(j % 1024));
}

// Every rank learns whether any rank saw a wrong value; all throw the same line.
void require_all_correct(parallel::Communicator& world, double first_bad_rank, const std::string& what) {
    double worst = first_bad_rank;  // -1 = fine
    world.all_reduce_max(&worst, 1);
    BMOE_REQUIRE(worst < 0, what, " returned wrong values on rank ", static_cast<int>(worst),
                 ": the interconnect or the MPI/NCCL setup corrupts data (try NCCL_DEBUG=INFO, or --comm=mpi)");
}

}  // namespace

std::vector<CommBenchRow> run_comm_bench(const CommBenchOptions& options,
                                         parallel::Communicator& world,
                                         std::ostream& log) {
    BMOE_REQUIRE(options.min_bytes >= 4 && options.min_bytes <= options.max_bytes,
                 "need 4 <= --min-bytes <= --max-bytes (got ", options.min_bytes, " and ", options.max_bytes, ")");
    BMOE_REQUIRE(options.iters >= 1 && options.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
    BMOE_REQUIRE(world.size() <= 128, "at most 128 ranks (the check values must stay exact in float)");
    const int P = world.size(), me = world.rank();
    auto backend = model::make_backend(options.backend, P > 1 ? parallel::launch_info().local_rank : 0);
    parallel::ProcessGrid grid(world, P);
    ParallelConfig parallel;
    parallel.comm = options.comm;
    const std::string chosen = setup_data_comm(parallel, *backend, grid);
    parallel::Communicator& comm = grid.data_world();
    BMOE_REQUIRE(backend->is_host() != comm.device_memory(), "the ", comm.name(), " communicator cannot read ",
                 backend->name(),
                 " buffers (CUDA + MPI stages through the host in training): use --comm=nccl with --backend=cuda");
    if (me == 0) {
        log << "comm-bench: ranks " << P << ", " << backend->name() << " buffers, comm " << chosen << ", "
            << options.iters << " timed calls after " << options.warmup << " warm-up\n";
        log << "         op        bytes     time(us)  algbw(GB/s)  busbw(GB/s)  check\n";
    }
    std::vector<CommBenchRow> rows;
    for (size_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= 2) {
        const size_t count = bytes / sizeof(float) / P * P;  // floats per rank, whole blocks per peer
        if (count == 0) continue;
        const size_t block = count / P;
        model::Buffer<float> send(backend.get(), count), recv(backend.get(), count);
        std::vector<float> host(count);
        std::vector<int64_t> counts(P, static_cast<int64_t>(block));
        for (const char* op : {"all_reduce", "all_to_all"}) {
            const bool reduce = op[4] == 'r';
            auto call = [&] {
                if (reduce)
                    comm.all_reduce_sum(send.data(), count);
                else
                    comm.all_to_all_v(send.data(), counts.data(), recv.data(), counts.data());
            };
            // 1. one checked call
            for (size_t i = 0; i < count; ++i)
                host[i] = reduce ? reduce_input(me, i) : block_value(me, static_cast<int>(i / block), P, i % block);
            send.upload(host);
            call();
            std::vector<float> got = (reduce ? send : recv).download();
            double bad = -1.0;
            for (size_t i = 0; i < count && bad < 0; ++i) {
                const float want = reduce ? static_cast<float>((i % 7 + 1) * P * (P + 1) / 2)
                                          : block_value(static_cast<int>(i / block), me, P, i % block);
                if (got[i] != want) bad = me;
            }
            require_all_correct(world, bad,
                                std::string(op) + " of " + std::to_string(count * sizeof(float)) + " bytes");
            // 2. timed calls (zeros: all-reduce sums must not overflow over the iterations)
            send.zero();
            for (int i = 0; i < options.warmup; ++i) call();
            backend->synchronize();
            world.barrier();
            const auto start = Clock::now();
            for (int i = 0; i < options.iters; ++i) call();
            backend->synchronize();
            double seconds = std::chrono::duration<double>(Clock::now() - start).count() / options.iters;
            world.all_reduce_max(&seconds, 1);
            CommBenchRow row;
            row.op = op;
            row.bytes = count * sizeof(float);
            row.seconds = seconds;
            row.algbw_gbs = static_cast<double>(row.bytes) / seconds / 1e9;
            row.busbw_gbs = row.algbw_gbs * (reduce ? 2.0 * (P - 1) / P : static_cast<double>(P - 1) / P);
            rows.push_back(row);
            if (me == 0) {
                char line[160];
                std::snprintf(line, sizeof line, "%11s %12zu %12.1f %12.2f %12.2f  ok\n", op, row.bytes, 1e6 * seconds,
                              row.algbw_gbs, row.busbw_gbs);
                log << line;
            }
        }
    }
    if (me == 0) {
        log << (P == 1 ? "comm-bench: one rank: nothing crosses a link (busbw 0); run it under mpirun/srun -n P\n"
                       : "comm-bench: busbw is comparable with the link's peak (nccl-tests convention)\n");
        log.flush();
    }
    return rows;
}

}  // namespace bmoe::trainer
