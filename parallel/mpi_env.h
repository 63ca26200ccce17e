// mpi_env.h -- process-level MPI: MpiEnvironment (RAII init/finalize), launcher detection,
// LaunchInfo (rank/local rank/sizes/hostname), and abort_job (one failing rank ends the job).
//
// Threading: MPI is initialized with MPI_THREAD_FUNNELED -- OpenMP threads may run between MPI
// calls, but only the thread that created the MpiEnvironment calls MPI.
#pragma once

#include <functional>
#include <optional>
#include <string>

namespace bmoe::parallel {

// Initializes MPI (MPI_Init_thread, FUNNELED) unless it already is, and finalizes it in the
// destructor if this object initialized it. When it initializes MPI it also sets MPI_ERRORS_RETURN
// on MPI_COMM_WORLD, so failed MPI calls reach MPI_CHECK (and become bmoe::Error) instead of
// aborting inside MPI. Create one, in main, before any MpiComm; destroy it after the last.
class MpiEnvironment {
  public:
    MpiEnvironment() : MpiEnvironment(nullptr, nullptr) {}
    MpiEnvironment(int* argc, char*** argv);
    MpiEnvironment(const MpiEnvironment&) = delete;
    MpiEnvironment& operator=(const MpiEnvironment&) = delete;
    ~MpiEnvironment();

    bool initialized_here() const { return initialized_here_; }

  private:
    bool initialized_here_ = false;
};

// Where this process sits in the job.
struct LaunchInfo {
    int rank = 0;        // in the world
    int local_rank = 0;  // among the ranks on this host (picks the GPU)
    int world_size = 1;
    int local_size = 1;  // ranks on this host
    std::string hostname;
    std::string source;  // where the numbers came from: "openmpi", "pmi", "slurm", "pmix", "mpi", "single"
};

// Environment lookup (std::getenv by default); tests pass a fake one.
using EnvLookup = std::function<const char*(const char* name)>;

// True when a launcher started this process as one rank of a job: OMPI_COMM_WORLD_SIZE (Open MPI),
// PMIX_RANK (PMIx), PMI_RANK (MPICH/Hydra, Intel MPI) or SLURM_PROCID together with SLURM_NTASKS
// (srun; NOTES: an sbatch script's own environment has these too, so a process started directly
// in a batch script counts as launched -- MPI then runs it as a singleton of size 1).
bool launched_under_mpi();
bool launched_under_mpi(const EnvLookup& env);

// Launch layout from launcher variables alone (no MPI calls, so usable before MPI_Init), first
// match wins: Open MPI (OMPI_COMM_WORLD_RANK/_LOCAL_RANK/_SIZE/_LOCAL_SIZE), MPICH/Hydra (PMI_RANK,
// PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS), Slurm (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
// and the tasks on this node from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE at
// SLURM_NODEID). nullopt when none is complete (PMIx alone gives only the rank). The hostname is
// left empty. Throws bmoe::Error when a variable that is set is not a number in range.
std::optional<LaunchInfo> launch_info_from_env(const EnvLookup& env);

// The full picture: once MPI is initialized, the world rank and size come from MPI_COMM_WORLD
// (they win over the environment) and the local rank/size from the environment when it describes
// the same world, else from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED). Before MPI_Init: the
// environment, or a single process (rank 0 of 1). hostname from gethostname(). NOTES: collective
// over MPI_COMM_WORLD when MPI is up and the environment does not match it -- call it on every rank.
LaunchInfo launch_info();

// Tasks on node `node_id` from Slurm's compressed per-node list, e.g. "2(x3),1" = three nodes with
// 2 tasks, then one with 1. Returns -1 when the list is malformed or shorter than node_id + 1.
int slurm_tasks_on_node(const std::string& tasks_per_node, int node_id);

// Prints "bmoe[rank R@host]: error: <message>" to stderr and ends the whole job: MPI_Abort on
// MPI_COMM_WORLD when MPI is up (so the other ranks do not hang in a collective), else _Exit.
// For main's catch of bmoe::Error; library code throws instead.
[[noreturn]] void abort_job(const std::string& message, int code = 1);

}  // namespace bmoe::parallel
