// communicator.h -- Communicator: the collectives bmoe needs, over one group of ranks.
//
// Implementations: LocalComm (one rank, identity copies; unit tests and single-process runs),
// MpiComm (host buffers over an MPI_Comm; CPU runs and CI under mpiexec) and, with the CUDA
// backend, NcclComm (device buffers on the communicator's stream). Buffer pointers are host memory
// for LocalComm/MpiComm and device memory for NcclComm, so callers pass the buffers of the backend
// that owns the communicator; counts and the exchange_counts vectors are always host memory.
//
// Contract (all methods): collective over the whole group -- every rank calls the same methods in
// the same order with matching sizes -- and called from one thread only (MPI_THREAD_FUNNELED).
// Counts are elements unless the parameter name says bytes. Failures throw bmoe::Error.
// Legend: P = size() (ranks in the group).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace bmoe::parallel {

class Communicator {
  public:
    Communicator() = default;
    Communicator(const Communicator&) = delete;
    Communicator& operator=(const Communicator&) = delete;
    virtual ~Communicator() = default;

    virtual int rank() const = 0;  // 0 .. size()-1
    virtual int size() const = 0;
    virtual std::string name() const = 0;  // backend name: "local", "mpi", "nccl"
    // True when buffers are device memory (NcclComm); false for host memory (LocalComm, MpiComm).
    virtual bool device_memory() const { return false; }

    // In-place element-wise reductions over all ranks: buf[i] = op over ranks of buf[i].
    // NOTES: every rank receives bitwise the same result, and the result is reproducible run to run
    // for a fixed group size, count and MPI/NCCL build, but the summation order is the library's
    // (it picks an algorithm by message and group size), so a float sum may differ in the last bits
    // from a sequential sum over ranks and between runs with different group sizes.
    virtual void all_reduce_sum(float* buf, size_t count) = 0;
    virtual void all_reduce_sum(double* buf, size_t count) = 0;
    virtual void all_reduce_sum(int64_t* buf, size_t count) = 0;
    virtual void all_reduce_max(double* buf, size_t count) = 0;

    // Asynchronous sum, to overlap gradient reduction with the rest of backward: queues
    // buf[i] = sum over ranks of buf[i] and returns at once. buf must not be read or written until
    // wait_reductions() returns; every rank starts the same reductions in the same order.
    // Default: synchronous (the sum is done on return). MpiComm: MPI_Iallreduce. NcclComm: on the
    // communicator's stream, ordered after the compute stream's work queued so far.
    virtual void start_all_reduce_sum(float* buf, size_t count) { all_reduce_sum(buf, count); }
    // Lets started reductions advance (MPI moves non-blocking collectives only inside MPI calls,
    // so backward calls this between layers). Cheap; never waits.
    virtual void progress() {}
    // Completes every started reduction: afterwards the buffers hold the sums (NcclComm: for work
    // queued later on the compute stream).
    virtual void wait_reductions() {}

    // Copies num_bytes from `root`'s buf into every other rank's buf.
    virtual void broadcast(void* buf, size_t num_bytes, int root) = 0;

    // recv[r*bytes_per_rank .. (r+1)*bytes_per_rank) = rank r's send, for r in [0, P).
    // send: [bytes_per_rank] bytes; recv: [P * bytes_per_rank] bytes; they must not overlap.
    virtual void all_gather(const void* send, size_t bytes_per_rank, void* recv) = 0;

    // Variable all-to-all: this rank sends send_counts[p] elements to rank p and receives
    // recv_counts[p] elements from rank p. Per-peer blocks are packed in rank order (displacements
    // are the prefix sums of the counts); counts may be zero. recv_counts[p] on this rank must
    // equal send_counts[this rank] on rank p (exchange_counts computes it).
    //   send: [sum(send_counts)] elements, recv: [sum(recv_counts)] elements, no overlap;
    //   send_counts, recv_counts: [P] host arrays.
    virtual void all_to_all_v(const float* send,
                              const int64_t* send_counts,
                              float* recv,
                              const int64_t* recv_counts) = 0;
    virtual void all_to_all_v(const int32_t* send,
                              const int64_t* send_counts,
                              int32_t* recv,
                              const int64_t* recv_counts) = 0;

    // All-to-all of m counts per peer (m = send_counts.size() / size(), the same on every rank):
    // returns recv_counts [P * m] with recv_counts[p*m + i] = send_counts[this rank*m + i] as passed
    // on rank p. The count exchange that precedes a payload all_to_all_v (m = 1), or the per
    // (peer, local expert) row counts of the expert dispatcher (m = local experts).
    virtual std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) = 0;

    virtual void barrier() = 0;

    // Partitions the group like MPI_Comm_split: ranks passing the same color (>= 0) form one new
    // communicator, ordered by key (ties by rank()). Collective; the result owns its resources.
    virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

}  // namespace bmoe::parallel
