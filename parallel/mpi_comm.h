// mpi_comm.h -- MpiComm: the Communicator over an MPI communicator, for host buffers.
//
// Wraps an MPI_Comm: borrowed (MPI_COMM_WORLD, or one the caller frees) or owned (made by split()
// and freed by the destructor). MPI must be initialized first (MpiEnvironment) and finalized only
// after every MpiComm is gone. Open MPI here is not CUDA-aware: never pass device pointers.
//
// NOTES: MPI-3.1 counts and displacements are int. Transfers beyond max_count() (INT_MAX by
// default) are chunked (all-reduce), described with one large derived datatype (broadcast,
// all_gather), or, for all_to_all_v, sent in units of the largest common factor of the counts
// (alltoallv_unit; token rows of D floats always have one). all_to_all_v throws bmoe::Error when
// no unit fits; the other ranks then block in the collective until abort_job ends the job.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "parallel/communicator.h"

namespace bmoe::parallel {

class MpiComm final : public Communicator {
  public:
    // Borrows `comm` (e.g. MPI_COMM_WORLD): the caller keeps it valid for this object's lifetime.
    explicit MpiComm(MPI_Comm comm);
    ~MpiComm() override;  // frees the communicator if split() created it (skipped after MPI_Finalize)

    MPI_Comm handle() const { return comm_; }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    std::string name() const override { return "mpi"; }

    void all_reduce_sum(float* buf, size_t count) override;
    void all_reduce_sum(double* buf, size_t count) override;
    void all_reduce_sum(int64_t* buf, size_t count) override;
    void all_reduce_max(double* buf, size_t count) override;
    void start_all_reduce_sum(float* buf, size_t count) override;  // MPI_Iallreduce
    void progress() override;                                      // MPI_Testall
    void wait_reductions() override;                               // MPI_Waitall

    void broadcast(void* buf, size_t num_bytes, int root) override;
    void all_gather(const void* send, size_t bytes_per_rank, void* recv) override;
    void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) override;
    void all_to_all_v(const int32_t* send,
                      const int64_t* send_counts,
                      int32_t* recv,
                      const int64_t* recv_counts) override;
    std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) override;

    void barrier() override;
    std::unique_ptr<Communicator> split(int color, int key) override;

    // The largest count passed to one MPI call. INT_MAX unless lowered -- tests lower it to run the
    // large-message paths on small buffers. Must be the same on every rank; split() inherits it.
    int64_t max_count() const { return max_count_; }
    void set_max_count(int64_t max_count);

  private:
    MpiComm(MPI_Comm comm, bool owned, int64_t max_count);
    void all_reduce(void* buf, size_t count, size_t element_size, MPI_Datatype type, MPI_Op op);
    void all_to_all_v_impl(const void* send,
                           const int64_t* send_counts,
                           void* recv,
                           const int64_t* recv_counts,
                           MPI_Datatype type,
                           size_t element_size);

    MPI_Comm comm_ = MPI_COMM_NULL;
    bool owned_ = false;
    int rank_ = 0;
    int size_ = 0;
    int64_t max_count_ = INT_MAX;
    std::vector<MPI_Request> pending_;  // started reductions (start_all_reduce_sum)
};

// Unit (in elements) for one side of an MPI_Alltoallv whose per-peer counts are counts[0..n):
// every count and every displacement (prefix sum) is a multiple of the unit and, divided by it, at
// most max_count. Returns 1 when the plain counts fit, else the greatest common divisor of the
// counts when that fits, else 0 (no unit works: the caller throws).
int64_t alltoallv_unit(const int64_t* counts, int n, int64_t max_count);

}  // namespace bmoe::parallel
