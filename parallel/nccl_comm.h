// nccl_comm.h -- NcclComm: the Communicator over NCCL, for device buffers on one GPU per rank.
//
// Buffer pointers are device memory on the current device; counts and the exchange_counts vectors
// are host memory. Plain-C++ header (no CUDA/NCCL includes): handles are held through their opaque
// struct types, so g++-compiled code can include it.
//
// Streams: NcclComm is built with the caller's compute stream (CudaBackend::stream()). All NCCL
// work runs on one communication stream, created non-blocking by make_nccl_world and shared with
// every communicator split() from it, so the NCCL work of one process runs in issue order -- the
// same order on every rank, hence no deadlock between communicators. Each collective first makes
// the comm stream wait (event) for the work queued on the compute stream so far. Blocking methods
// then synchronize the comm stream, so buffers are ready when they return; start_all_reduce_sum
// only queues, and wait_reductions() makes the compute stream wait for the comm stream (the host
// does not block). A failure throws bmoe::Error and marks the communicator failed: its destructor
// then aborts it (ncclCommAbort) instead of a finalizing ncclCommDestroy.
//
// NOTES: determinism -- the all-reduce summation order is NCCL's (algorithm and protocol picked by
// message and group size, NCCL_ALGO/NCCL_PROTO override it): every rank gets bitwise the same
// result, reproducible for a fixed group size, count, GPU topology and NCCL build, but a float sum
// may differ in the last bits from MpiComm's or from a sequential sum over ranks.
// NOTES: NCCL refuses two ranks on one GPU; make_nccl_world checks this first (find_shared_device)
// so every rank throws the same one-line error instead of failing inside NCCL.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

struct ncclComm;     // ncclComm_t is ncclComm*
struct CUstream_st;  // cudaStream_t is CUstream_st*
struct CUevent_st;   // cudaEvent_t is CUevent_st*

namespace bmoe::parallel {

class NcclComm final : public Communicator {
  public:
    // Takes ownership of `comm` (initialized on the current device) and shares `comm_stream` with
    // the communicators it splits into. compute_stream: where the caller queues its device work
    // (nullptr = the legacy default stream); borrowed, must outlive this object.
    NcclComm(ncclComm* comm, CUstream_st* compute_stream, std::shared_ptr<CUstream_st> comm_stream);
    ~NcclComm() override;

    int rank() const override { return rank_; }
    int size() const override { return size_; }
    std::string name() const override { return "nccl"; }
    bool device_memory() const override { return true; }

    void all_reduce_sum(float* buf, size_t count) override;
    void all_reduce_sum(double* buf, size_t count) override;
    void all_reduce_sum(int64_t* buf, size_t count) override;
    void all_reduce_max(double* buf, size_t count) override;

    // Queued on the comm stream after the compute stream's work so far; progress() has nothing to
    // do (NCCL kernels advance on their own); wait_reductions() orders the compute stream after
    // them without blocking the host.
    void start_all_reduce_sum(float* buf, size_t count) override;
    void wait_reductions() override;

    void broadcast(void* buf, size_t num_bytes, int root) override;
    void all_gather(const void* send, size_t bytes_per_rank, void* recv) override;
    void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) override;
    void all_to_all_v(const int32_t* send,
                      const int64_t* send_counts,
                      int32_t* recv,
                      const int64_t* recv_counts) override;
    std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) override;

    void barrier() override;
    // ncclCommSplit: the result shares this communicator's comm and compute streams. A negative
    // color leaves this rank out (NCCL_SPLIT_NOCOLOR): the call is still collective and returns
    // nullptr on that rank.
    std::unique_ptr<Communicator> split(int color, int key) override;

  private:
    // Calls f(); an exception from it marks the communicator failed (see release()). Refuses to run
    // on a failed communicator.
    template <typename F>
    void guarded(const char* what, F&& f);
    // Queues issue() (NCCL calls on the comm stream) after the compute stream's work; when blocking,
    // then waits for the comm stream and checks NCCL's asynchronous error. Guarded.
    template <typename Issue>
    void run(const char* what, bool blocking, Issue&& issue);
    void check_async_error(const char* what);  // throws when NCCL reports a failed operation
    void all_to_all_v_impl(
        const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts, size_t element_size);
    int64_t* counts_scratch(size_t count);  // device int64 scratch, grown on demand
    void release() noexcept;                // frees everything this object owns (destructor, failed constructor)

    std::shared_ptr<CUstream_st> comm_stream_;  // first member: destroyed after the communicator
    ncclComm* comm_ = nullptr;
    CUstream_st* compute_stream_ = nullptr;
    CUevent_st* compute_ready_ = nullptr;  // recorded on the compute stream, waited for by the comm stream
    CUevent_st* comm_done_ = nullptr;      // recorded on the comm stream, waited for by the compute stream
    int64_t* counts_dev_ = nullptr;        // exchange_counts send|recv, barrier's one element
    size_t counts_capacity_ = 0;
    int rank_ = 0;
    int size_ = 0;
    bool failed_ = false;
};

// The world communicator over NCCL, bootstrapped through `bootstrap` (the MPI world: a host-memory
// communicator). Collective over bootstrap. Every rank must already have selected its GPU
// (cudaSetDevice); compute_stream is that device's compute stream (CudaBackend::stream()).
// Throws bmoe::Error on every rank alike when two ranks of one host would share a GPU.
// NOTES: a failure inside NCCL initialization on one rank leaves the others blocked in it until
// abort_job ends the job, as with a failed MPI collective.
std::unique_ptr<Communicator> make_nccl_world(Communicator& bootstrap, CUstream_st* compute_stream);

// Where one rank runs: host name and the PCI bus id of its GPU (stable across
// CUDA_VISIBLE_DEVICES remapping), plus the CUDA ordinal for the message.
struct DeviceSlot {
    std::string host;
    std::string pci_bus_id;  // e.g. "0000:1B:00.0"
    int device = 0;          // CUDA ordinal on that rank
};

// Collective over bootstrap: find_shared_device over every rank's current GPU ("" when each rank
// has its own). The same answer on every rank; --parallel.comm=auto uses it to choose NCCL.
std::string shared_device_error(Communicator& bootstrap);

// The one-line error for the first pair of ranks (in rank order) whose slots name the same GPU on
// the same host, or "" when every rank has its own GPU. slots[r] belongs to rank r.
std::string find_shared_device(const std::vector<DeviceSlot>& slots);

}  // namespace bmoe::parallel
