// bench_checkpoint.cpp -- training checkpoint save/load time and size against the disk's plain
// sequential speed (issue 5's benchmark). An MPI program: run it under mpiexec with 1..N ranks.
//
//   bench_checkpoint [--config default|100m] [--dir DIR] [--reps N]
//
// Each rank builds its shard of the model like trainer/trainer.cpp does (ProcessGrid with
// ep = world size: experts split over the ranks, dense tensors replicated) and an AdamW, then:
//   save  save_training_checkpoint (collective: rank 0 gathers tensor by tensor, writes <path>.tmp,
//         flushes + fsyncs, reopens to verify every checksum, renames): the slowest rank's time.
//   load  load_training_checkpoint (every rank reads its own slices, checksums verified), "cold":
//         rank 0 first drops the file from the page cache (posix_fadvise DONTNEED after the
//         fsync), so the bytes come from the disk; the slowest rank's time. Then "warm" loads
//         (file in the page cache): the CPU side of reading (HDF5 + crc32), roughly what the
//         save's verify pass costs too.
//   disk  rank 0 alone (the other ranks wait without spinning): a file of the checkpoint's size
//         written with write(2) in 4 MiB blocks + fsync, dropped from the page cache, read back in
//         4 MiB blocks -- the plain sequential speed of the same disk (same directory).
// Every figure is the best and the median of --reps repetitions; MB/s = file bytes / seconds
// (MB = 10^6 bytes). Loaded tensors are compared with the saved ones (a broken load is an error).
// Configs: "default" = the comparison model of bench_train.cpp (vocab 256, d 256, 4 layers,
// 8 experts top-2, expert hidden 512); "100m" = d 512, 8 layers, 8 heads, 8 experts top-2, expert
// hidden 960 (~103M parameters). The checkpoint holds params + both AdamW moments (3 x params floats).
// Prints human-readable lines and one line "JSON {...}" for scripts (bench/bench_checkpoint.sh).
// Files are written under DIR (default: a fresh directory in $TMPDIR or /tmp) and removed at the end.
#include <fcntl.h>
#include <mpi.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "model/cpu_backend.h"
#include "model/cpu_threads.h"
#include "model/model.h"
#include "model/rng.h"
#include "parallel/check.h"
#include "parallel/mpi_check.h"
#include "parallel/mpi_comm.h"
#include "parallel/mpi_env.h"
#include "parallel/process_grid.h"
#include "trainer/checkpointing.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Options {
    std::string config = "default";
    std::string dir;  // "" = a fresh temp dir, removed at the end
    int reps = 3;
};

[[noreturn]] void usage_exit(int code) {
    std::fprintf(stderr, "usage: bench_checkpoint [--config default|100m] [--dir DIR] [--reps N]\n");
    std::exit(code);
}

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "bench_checkpoint: %s needs a value\n", arg.c_str());
                usage_exit(2);
            }
            return argv[++i];
        };
        if (arg == "--config")
            o.config = value();
        else if (arg == "--dir")
            o.dir = value();
        else if (arg == "--reps")
            o.reps = std::atoi(value().c_str());
        else
            usage_exit(arg == "--help" || arg == "-h" ? 0 : 2);
    }
    if ((o.config != "default" && o.config != "100m") || o.reps < 1) usage_exit(2);
    return o;
}

bmoe::model::ModelConfig model_config(const std::string& name) {
    bmoe::model::ModelConfig c;  // the comparison model (bench_train.cpp), set explicitly
    c.vocab_size = 256;
    c.max_seq_len = 256;
    c.d_model = 256;
    c.num_layers = 4;
    c.num_heads = 4;
    c.num_kv_heads = 4;
    c.num_experts = 8;
    c.top_k = 2;
    c.expert_hidden = 512;
    c.moe_every = 1;
    c.tie_embeddings = false;
    c.norm = bmoe::model::NormType::kRmsNorm;
    c.position = bmoe::model::PositionType::kRope;
    c.activation = bmoe::model::Activation::kSwiGlu;
    if (name == "100m") {  // per layer: 4 d^2 attention + 8 x 3 x d x F experts = 13.1M; x 8 layers
        c.d_model = 512;
        c.num_layers = 8;
        c.num_heads = 8;
        c.num_kv_heads = 8;
        c.expert_hidden = 960;
    }
    c.validate();
    return c;
}

// Parameters of the whole model (global shapes), whatever this rank holds.
size_t global_param_count(const bmoe::model::ParameterLayout& layout) {
    size_t total = 0;
    for (const bmoe::model::ParamInfo& p : layout.params()) {
        size_t n = 1;
        for (int64_t d : p.global_shape) n *= static_cast<size_t>(d);
        total += n;
    }
    return total;
}

struct Stats {
    double best = 0.0, median = 0.0;
};

Stats stats_of(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return {v.front(), n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2])};
}

// A barrier whose waiting ranks sleep instead of spinning in MPI's progress loop, so they do not
// take CPU from rank 0's disk measurement on an oversubscribed machine.
void quiet_barrier(MPI_Comm comm) {
    MPI_Request req;
    MPI_CHECK(MPI_Ibarrier(comm, &req));
    int done = 0;
    for (;;) {
        MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
        if (done) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

// Drops a file's (clean) pages from the page cache so the next read comes from the disk.
void drop_from_page_cache(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    BMOE_REQUIRE(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
    ::fdatasync(fd);  // dirty pages would stay cached
    const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    BMOE_REQUIRE(rc == 0, "posix_fadvise(DONTNEED) on ", path, " failed: ", std::strerror(rc));
}

constexpr size_t kBlock = size_t{4} << 20;  // 4 MiB

// Plain sequential write of `bytes` bytes (4 MiB write(2) calls) + fsync; returns seconds.
double disk_write(const std::string& path, size_t bytes, const std::vector<char>& block) {
    ::unlink(path.c_str());  // a fresh file every time, like the checkpoint's tmp + rename
    const auto start = Clock::now();
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    BMOE_REQUIRE(fd >= 0, "cannot create ", path, ": ", std::strerror(errno));
    size_t left = bytes;
    while (left > 0) {
        const size_t n = std::min(left, block.size());
        size_t done = 0;
        while (done < n) {
            const ssize_t w = ::write(fd, block.data() + done, n - done);
            BMOE_REQUIRE(w > 0 || (w < 0 && errno == EINTR), "write to ", path, " failed: ", std::strerror(errno));
            if (w > 0) done += static_cast<size_t>(w);
        }
        left -= n;
    }
    BMOE_REQUIRE(::fsync(fd) == 0, "fsync of ", path, " failed: ", std::strerror(errno));
    ::close(fd);
    return seconds_since(start);
}

// Plain sequential read of the whole file in 4 MiB read(2) calls; returns seconds.
double disk_read(const std::string& path, size_t expected_bytes, std::vector<char>& block) {
    const auto start = Clock::now();
    const int fd = ::open(path.c_str(), O_RDONLY);
    BMOE_REQUIRE(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
    size_t total = 0;
    for (;;) {
        const ssize_t r = ::read(fd, block.data(), block.size());
        if (r < 0 && errno == EINTR) continue;
        BMOE_REQUIRE(r >= 0, "read of ", path, " failed: ", std::strerror(errno));
        if (r == 0) break;
        total += static_cast<size_t>(r);
    }
    ::close(fd);
    BMOE_REQUIRE(total == expected_bytes, "read ", total, " bytes of ", path, ", expected ", expected_bytes);
    return seconds_since(start);
}

std::string json_stats(const char* key, const Stats& s) {
    return bmoe::concat("\"", key, "_best\":", s.best, ",\"", key, "_median\":", s.median);
}

}  // namespace

int main(int argc, char** argv) {
    bmoe::model::use_fast_openblas_kernels(argv);
    using namespace bmoe;
    parallel::MpiEnvironment mpi(&argc, &argv);
    const Options opt = parse_options(argc, argv);
    try {
        parallel::MpiComm world(MPI_COMM_WORLD);
        const int W = world.size(), rank = world.rank();
        const bool root = rank == 0;
        model::set_cpu_threads(1);

        // ---- model shard + optimizer, as trainer/trainer.cpp builds them (ep = world size) ----
        trainer::RunConfig run;
        run.model = model_config(opt.config);
        run.parallel.ep = W;
        parallel::ProcessGrid grid(world, W);
        const parallel::ExpertRange experts = grid.expert_range(run.model.num_experts);
        model::CpuBackend backend;
        model::ParallelContext ctx;
        if (W > 1) ctx.world = &grid.world();
        ctx.ep = &grid.ep();
        ctx.first_expert = experts.first;
        ctx.num_local_experts = experts.count;
        model::Model net(run.model, &backend, ctx);
        net.init_weights(/*seed=*/0);
        trainer::AdamW adamw(run.optim, net);
        // Moments as after some training: non-zero, derived from the parameters so that replicated
        // tensors hold the same moments on every rank (as after an all-reduced gradient).
        const size_t nm = adamw.moments_numel();
        {
            const std::vector<float> p = net.params_to_host();
            std::vector<float> m(nm), v(nm);
            const std::vector<model::ParamInfo>& infos = net.layout().params();
            for (size_t i = 0; i < infos.size(); ++i) {
                const size_t mo = adamw.moment_offset(i);
                if (mo == trainer::AdamW::kFrozen) continue;
                for (size_t j = 0; j < infos[i].numel; ++j) {
                    const float x = p[infos[i].offset + j];
                    m[mo + j] = 0.1f * x;
                    v[mo + j] = 1e-3f * x * x + 1e-12f;
                }
            }
            backend.upload(adamw.m(), m.data(), nm * sizeof(float));
            backend.upload(adamw.v(), v.data(), nm * sizeof(float));
        }
        const std::vector<float> saved_params = net.params_to_host();
        std::vector<float> saved_m(nm), saved_v(nm);
        backend.download(saved_m.data(), adamw.m(), nm * sizeof(float));
        backend.download(saved_v.data(), adamw.v(), nm * sizeof(float));

        const size_t params = global_param_count(net.layout());
        const size_t local_params = net.layout().total_numel();

        // ---- directory: --dir, or a fresh temp dir made by rank 0 and broadcast ----
        std::string dir = opt.dir;
        const bool own_dir = dir.empty();
        if (own_dir) {
            char buf[4096] = {};
            if (root) {
                const char* tmp = std::getenv("TMPDIR");
                std::string templ = concat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/bmoe_bench_ckpt.XXXXXX");
                BMOE_REQUIRE(templ.size() < sizeof(buf), "TMPDIR is too long");
                std::memcpy(buf, templ.c_str(), templ.size());
                BMOE_REQUIRE(::mkdtemp(buf) != nullptr, "mkdtemp(", templ, ") failed: ", std::strerror(errno));
            }
            world.broadcast(buf, sizeof(buf), 0);
            dir = buf;
        } else if (root) {
            fs::create_directories(dir);
        }
        world.barrier();
        const std::string path = concat(dir, "/bench_", opt.config, "_w", W, ".h5");
        const std::string disk_path = concat(dir, "/bench_disk_", opt.config, "_w", W, ".bin");

        if (root)
            std::printf(
                "bench_checkpoint: config %s (d %d, %d layers, %d experts top-%d, expert hidden %d), %zu params "
                "(%zu on rank 0), %d rank(s) (ep %d), %d rep(s), dir %s\n",
                opt.config.c_str(), run.model.d_model, run.model.num_layers, run.model.num_experts, run.model.top_k,
                run.model.expert_hidden, params, local_params, W, W, opt.reps, dir.c_str());

        // ---- save ----
        std::vector<double> save_s;
        for (int r = 0; r < opt.reps; ++r) {
            world.barrier();
            const auto start = Clock::now();
            trainer::save_training_checkpoint(path, /*step=*/r + 1, run, "", net, adamw, grid);
            double t = seconds_since(start);
            world.all_reduce_max(&t, 1);
            save_s.push_back(t);
        }
        int64_t file_bytes = root ? static_cast<int64_t>(fs::file_size(path)) : 0;
        world.all_reduce_sum(&file_bytes, 1);
        const double file_mb = static_cast<double>(file_bytes) / 1e6;

        // ---- load: cold (page cache dropped), then warm ----
        auto load_once = [&](bool cold) {
            if (cold && root) drop_from_page_cache(path);
            world.barrier();
            const auto start = Clock::now();
            trainer::load_training_checkpoint(path, net, adamw);
            double t = seconds_since(start);
            world.all_reduce_max(&t, 1);
            // The loaded state must be the saved one.
            std::vector<float> m(nm), v(nm);
            backend.download(m.data(), adamw.m(), nm * sizeof(float));
            backend.download(v.data(), adamw.v(), nm * sizeof(float));
            int64_t bad = (net.params_to_host() == saved_params && m == saved_m && v == saved_v) ? 0 : 1;
            world.all_reduce_sum(&bad, 1);
            BMOE_REQUIRE(bad == 0, bad, " rank(s) loaded a state that differs from the saved one");
            return t;
        };
        std::vector<double> load_cold_s, load_warm_s;
        for (int r = 0; r < opt.reps; ++r) load_cold_s.push_back(load_once(true));
        for (int r = 0; r < opt.reps; ++r) load_warm_s.push_back(load_once(false));

        // ---- plain sequential write/read of the same disk (rank 0; the others sleep) ----
        std::vector<double> disk_write_s, disk_read_s;
        if (root) {
            std::vector<char> block(kBlock);
            model::CounterRng rng(11, 0);
            for (size_t i = 0; i < kBlock / 4; ++i) {
                const uint32_t x = static_cast<uint32_t>(rng.bits(i));
                std::memcpy(block.data() + 4 * i, &x, 4);
            }
            for (int r = 0; r < opt.reps; ++r) {
                disk_write_s.push_back(disk_write(disk_path, static_cast<size_t>(file_bytes), block));
                drop_from_page_cache(disk_path);
                disk_read_s.push_back(disk_read(disk_path, static_cast<size_t>(file_bytes), block));
            }
            ::unlink(disk_path.c_str());
        }
        quiet_barrier(world.handle());

        // ---- clean up ----
        if (root) {
            std::error_code ec;
            fs::remove(path, ec);
            fs::remove(path + ".tmp", ec);
            if (own_dir) fs::remove(dir, ec);
        }
        world.barrier();

        if (root) {
            const Stats save = stats_of(save_s), cold = stats_of(load_cold_s), warm = stats_of(load_warm_s);
            const Stats dw = stats_of(disk_write_s), dr = stats_of(disk_read_s);
            auto line = [&](const char* what, const Stats& s) {
                std::printf("%-24s best %7.3f s (%7.1f MB/s)   median %7.3f s (%7.1f MB/s)\n", what, s.best,
                            file_mb / s.best, s.median, file_mb / s.median);
            };
            std::printf("checkpoint file: %.1f MB (%lld bytes; params + AdamW m + v = %.1f MB of float32)\n", file_mb,
                        static_cast<long long>(file_bytes), 3.0 * 4.0 * static_cast<double>(params) / 1e6);
            line("save (fsync + verify)", save);
            line("load cold (from disk)", cold);
            line("load warm (page cache)", warm);
            line("disk write 4MiB + fsync", dw);
            line("disk read 4MiB (cold)", dr);
            std::printf("save / disk write: %.0f%% (best), load cold / disk read: %.0f%% (best)\n",
                        100.0 * dw.best / save.best, 100.0 * dr.best / cold.best);
            std::printf(
                "JSON {\"config\":\"%s\",\"params\":%zu,\"rank0_params\":%zu,\"ranks\":%d,\"reps\":%d,"
                "\"file_bytes\":%lld,%s,%s,%s,%s,%s}\n",
                opt.config.c_str(), params, local_params, W, opt.reps, static_cast<long long>(file_bytes),
                json_stats("save_s", save).c_str(), json_stats("load_cold_s", cold).c_str(),
                json_stats("load_warm_s", warm).c_str(), json_stats("disk_write_s", dw).c_str(),
                json_stats("disk_read_s", dr).c_str());
            std::fflush(stdout);
        }
    } catch (const std::exception& e) {
        parallel::abort_job(std::string("bench_checkpoint: ") + e.what(), 1);
    }
    return 0;
}
