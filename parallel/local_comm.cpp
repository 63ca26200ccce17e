// local_comm.cpp -- LocalComm: identity collectives for a group of one rank.
#include "parallel/local_comm.h"

#include <cstring>

#include "parallel/check.h"

namespace bmoe::parallel {

namespace {

// The only peer is this rank: the send block goes to the receive buffer.
template <typename T>
void copy_to_self(const T* send, const int64_t* send_counts, T* recv, const int64_t* recv_counts) {
    BMOE_ASSERT(send_counts[0] == recv_counts[0], "LocalComm::all_to_all_v sends ", send_counts[0],
                " elements to itself but expects ", recv_counts[0]);
    BMOE_ASSERT(send_counts[0] >= 0, "negative count ", send_counts[0]);
    if (send_counts[0] > 0) std::memcpy(recv, send, static_cast<size_t>(send_counts[0]) * sizeof(T));
}

}  // namespace

void LocalComm::broadcast(void*, size_t, int root) {
    BMOE_ASSERT(root == 0, "broadcast root ", root, " is not a rank of a size-1 communicator");
}

void LocalComm::all_gather(const void* send, size_t bytes_per_rank, void* recv) {
    if (bytes_per_rank > 0) std::memcpy(recv, send, bytes_per_rank);
}

void LocalComm::all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) {
    copy_to_self(send, send_counts, recv, recv_counts);
}

void LocalComm::all_to_all_v(const int32_t* send,
                             const int64_t* send_counts,
                             int32_t* recv,
                             const int64_t* recv_counts) {
    copy_to_self(send, send_counts, recv, recv_counts);
}

std::vector<int64_t> LocalComm::exchange_counts(const std::vector<int64_t>& send_counts) {
    BMOE_ASSERT(!send_counts.empty(), "exchange_counts needs at least one count");
    return send_counts;
}

std::unique_ptr<Communicator> LocalComm::split(int color, int) {
    BMOE_ASSERT(color >= 0, "split color must be >= 0 (got ", color, ")");
    return std::make_unique<LocalComm>();
}

}  // namespace bmoe::parallel
