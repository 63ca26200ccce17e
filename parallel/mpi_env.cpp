// mpi_env.cpp -- MpiEnvironment, launcher detection and LaunchInfo, abort_job.
#include "parallel/mpi_env.h"

#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "parallel/check.h"
#include "parallel/mpi_check.h"

namespace bmoe::parallel {

namespace {

const char* system_env(const char* name) { return std::getenv(name); }

bool mpi_is_up() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    return initialized && !finalized;
}

std::string host_name() {
    char name[256] = {};
    if (gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
    return name;
}

// Parses a non-negative decimal int; nullopt when text is not one.
std::optional<int> parse_count(const std::string& text) {
    if (text.empty() || text.size() > 10) return std::nullopt;
    long long value = 0;
    for (char c : text) {
        if (c < '0' || c > '9') return std::nullopt;
        value = value * 10 + (c - '0');
    }
    if (value > INT_MAX) return std::nullopt;
    return static_cast<int>(value);
}

// A launcher variable as a number: nullopt when unset, bmoe::Error when set to something else.
std::optional<int> env_int(const EnvLookup& env, const char* name) {
    const char* value = env(name);
    if (value == nullptr) return std::nullopt;
    std::optional<int> parsed = parse_count(value);
    BMOE_REQUIRE(parsed.has_value(), "the launcher variable ", name, "='", value,
                 "' is not a non-negative integer: unset it or fix the launch script");
    return parsed;
}

// A complete layout from one launcher's variables, checked for consistency; nullopt if any is unset.
std::optional<LaunchInfo> layout(const char* source,
                                 std::optional<int> rank,
                                 std::optional<int> world_size,
                                 std::optional<int> local_rank,
                                 std::optional<int> local_size) {
    if (!rank || !world_size || !local_rank || !local_size) return std::nullopt;
    BMOE_REQUIRE(*rank < *world_size && *local_rank < *local_size && *local_size <= *world_size, "the ", source,
                 " launcher variables are inconsistent: rank ", *rank, " of ", *world_size, ", local rank ",
                 *local_rank, " of ", *local_size, " (check the launch script)");
    LaunchInfo info;
    info.rank = *rank;
    info.world_size = *world_size;
    info.local_rank = *local_rank;
    info.local_size = *local_size;
    info.source = source;
    return info;
}

std::optional<int> slurm_local_size(const EnvLookup& env) {
    std::optional<int> node_id = env_int(env, "SLURM_NODEID");
    if (!node_id) return std::nullopt;
    for (const char* name : {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"}) {
        const char* list = env(name);
        if (list == nullptr) continue;
        const int num_tasks = slurm_tasks_on_node(list, *node_id);
        BMOE_REQUIRE(num_tasks > 0, "cannot read the tasks of node ", *node_id, " from ", name, "='", list,
                     "' (expected a list like 2(x3),1)");
        return num_tasks;
    }
    return std::nullopt;
}

}  // namespace

// ----------------------------------------------------------------------------
// MpiEnvironment

MpiEnvironment::MpiEnvironment(int* argc, char*** argv) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    BMOE_REQUIRE(!finalized, "MPI was already finalized in this process and cannot be initialized again");
    if (initialized) return;
    int provided = MPI_THREAD_SINGLE;
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    initialized_here_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
        MPI_Finalize();
        initialized_here_ = false;
        throw Error(
            "this MPI library does not support MPI_THREAD_FUNNELED, which bmoe's OpenMP loops need: "
            "use an MPI built with thread support");
    }
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
}

MpiEnvironment::~MpiEnvironment() {
    if (initialized_here_ && mpi_is_up()) MPI_Finalize();
}

// ----------------------------------------------------------------------------
// launcher detection

bool launched_under_mpi(const EnvLookup& env) {
    return env("OMPI_COMM_WORLD_SIZE") != nullptr || env("PMIX_RANK") != nullptr || env("PMI_RANK") != nullptr ||
           (env("SLURM_PROCID") != nullptr && env("SLURM_NTASKS") != nullptr);
}

bool launched_under_mpi() { return launched_under_mpi(system_env); }

int slurm_tasks_on_node(const std::string& tasks_per_node, int node_id) {
    // Items are "N" or "N(xK)" (K consecutive nodes with N tasks each), comma-separated.
    int node = 0;
    size_t pos = 0;
    while (pos <= tasks_per_node.size()) {
        size_t end = tasks_per_node.find(',', pos);
        if (end == std::string::npos) end = tasks_per_node.size();
        const std::string item = tasks_per_node.substr(pos, end - pos);
        const size_t paren = item.find('(');
        std::optional<int> num_tasks = parse_count(item.substr(0, paren));
        std::optional<int> repeat = 1;
        if (paren != std::string::npos) {
            if (item.size() < paren + 4 || item.compare(paren, 2, "(x") != 0 || item.back() != ')') return -1;
            repeat = parse_count(item.substr(paren + 2, item.size() - paren - 3));
        }
        if (!num_tasks || !repeat) return -1;
        if (node_id < node + *repeat) return *num_tasks;
        node += *repeat;
        pos = end + 1;
    }
    return -1;
}

std::optional<LaunchInfo> launch_info_from_env(const EnvLookup& env) {
    if (env("OMPI_COMM_WORLD_SIZE") != nullptr) {
        return layout("openmpi", env_int(env, "OMPI_COMM_WORLD_RANK"), env_int(env, "OMPI_COMM_WORLD_SIZE"),
                      env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"));
    }
    if (env("PMI_RANK") != nullptr) {
        return layout("pmi", env_int(env, "PMI_RANK"), env_int(env, "PMI_SIZE"), env_int(env, "MPI_LOCALRANKID"),
                      env_int(env, "MPI_LOCALNRANKS"));
    }
    if (env("SLURM_PROCID") != nullptr && env("SLURM_NTASKS") != nullptr) {
        return layout("slurm", env_int(env, "SLURM_PROCID"), env_int(env, "SLURM_NTASKS"),
                      env_int(env, "SLURM_LOCALID"), slurm_local_size(env));
    }
    return std::nullopt;
}

LaunchInfo launch_info() {
    std::optional<LaunchInfo> from_env = launch_info_from_env(system_env);
    LaunchInfo info;
    if (mpi_is_up()) {
        info.source = "mpi";
        MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &info.rank));
        MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &info.world_size));
        if (from_env && from_env->rank == info.rank && from_env->world_size == info.world_size) {
            info = *from_env;
        } else {
            MPI_Comm node = MPI_COMM_NULL;
            MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.rank, MPI_INFO_NULL, &node));
            MPI_CHECK(MPI_Comm_rank(node, &info.local_rank));
            MPI_CHECK(MPI_Comm_size(node, &info.local_size));
            MPI_Comm_free(&node);
        }
    } else if (from_env) {
        info = *from_env;
    } else {
        info.source = "single";
    }
    info.hostname = host_name();
    return info;
}

// ----------------------------------------------------------------------------
// abort_job

void abort_job(const std::string& message, int code) {
    // No collectives here: only this rank may be failing.
    int rank = -1;
    if (mpi_is_up()) {
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    } else {
        rank = 0;
        for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"}) {
            if (const char* value = std::getenv(name); value != nullptr) {
                rank = parse_count(value).value_or(-1);
                break;
            }
        }
    }
    std::fprintf(stderr, "bmoe[rank %d@%s]: error: %s\n", rank, host_name().c_str(), message.c_str());
    std::fflush(stderr);
    if (mpi_is_up()) MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
}

}  // namespace bmoe::parallel
