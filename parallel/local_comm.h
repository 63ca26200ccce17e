// local_comm.h -- LocalComm: the one-rank Communicator (rank 0 of size 1).
// Reductions leave the buffer as it is; broadcast, all_gather and all_to_all_v copy send to recv.
// No MPI needed: unit tests and single-process runs use it, and it is the reference that MpiComm
// must match at size 1. Host buffers only.
#pragma once

#include "parallel/communicator.h"

namespace bmoe::parallel {

class LocalComm final : public Communicator {
  public:
    int rank() const override { return 0; }
    int size() const override { return 1; }
    std::string name() const override { return "local"; }

    void all_reduce_sum(float*, size_t) override {}
    void all_reduce_sum(double*, size_t) override {}
    void all_reduce_sum(int64_t*, size_t) override {}
    void all_reduce_max(double*, size_t) override {}

    void broadcast(void* buf, size_t num_bytes, int root) override;
    void all_gather(const void* send, size_t bytes_per_rank, void* recv) override;
    void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) override;
    void all_to_all_v(const int32_t* send,
                      const int64_t* send_counts,
                      int32_t* recv,
                      const int64_t* recv_counts) override;
    std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) override;

    void barrier() override {}
    std::unique_ptr<Communicator> split(int color, int key) override;
};

}  // namespace bmoe::parallel
