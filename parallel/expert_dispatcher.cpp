#include "parallel/expert_dispatcher.h"

#include <chrono>
#include <numeric>

#include "parallel/check.h"

namespace bmoe::parallel {

using Clock = std::chrono::steady_clock;

int64_t DispatchHandle::num_sent_rows() const {
    return std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
}

ExpertDispatcher::ExpertDispatcher(Communicator& rows, int num_experts, Communicator* counts)
    : ep_(rows),
      counts_(counts != nullptr ? *counts : rows),
      num_experts_(num_experts),
      num_local_experts_(num_experts / rows.size()) {
    BMOE_ASSERT(counts_.size() == ep_.size() && counts_.rank() == ep_.rank(),
                "the count communicator must span the EP group with the same ranks");
    BMOE_REQUIRE(num_experts % rows.size() == 0, "model.num_experts (", num_experts,
                 ") must be divisible by the expert-parallel size (", rows.size(), "): change --parallel.ep");
}

DispatchHandle ExpertDispatcher::plan(const std::vector<int>& expert_offsets) {
    const int P = ep_.size(), El = num_local_experts_;
    BMOE_ASSERT(static_cast<int>(expert_offsets.size()) == num_experts_ + 1, "expert_offsets size");
    DispatchHandle h;
    h.num_local_experts = El;
    h.send_rows.assign(P, 0);
    for (int p = 0; p < P; ++p) h.send_rows[p] = expert_offsets[(p + 1) * El] - expert_offsets[p * El];
    // per (peer, local expert) counts, so the receiver can regroup; always host memory
    std::vector<int64_t> expert_rows(num_experts_);
    for (int e = 0; e < num_experts_; ++e) expert_rows[e] = expert_offsets[e + 1] - expert_offsets[e];
    const auto t0 = Clock::now();
    h.recv_expert_rows = counts_.exchange_counts(expert_rows);
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
    h.recv_rows.assign(P, 0);
    for (int s = 0; s < P; ++s)
        for (int le = 0; le < El; ++le) h.recv_rows[s] += h.recv_expert_rows[static_cast<size_t>(s) * El + le];

    // received order is (source, local expert); sorted order is (local expert, source)
    h.local_expert_offsets.assign(El + 1, 0);
    for (int le = 0; le < El; ++le) {
        int64_t n = 0;
        for (int s = 0; s < P; ++s) n += h.recv_expert_rows[static_cast<size_t>(s) * El + le];
        h.local_expert_offsets[le + 1] = h.local_expert_offsets[le] + static_cast<int>(n);
    }
    h.received_to_sorted.resize(h.num_local_rows());
    h.sorted_to_received.resize(h.num_local_rows());
    std::vector<int64_t> next(h.local_expert_offsets.begin(), h.local_expert_offsets.end() - 1);
    int32_t r = 0;
    for (int s = 0; s < P; ++s)
        for (int le = 0; le < El; ++le)
            for (int64_t i = 0; i < h.recv_expert_rows[static_cast<size_t>(s) * El + le]; ++i, ++r) {
                const auto sorted = static_cast<int32_t>(next[le]++);
                h.received_to_sorted[r] = sorted;
                h.sorted_to_received[sorted] = r;
            }
    return h;
}

template <typename T>
void ExpertDispatcher::send_to_experts(const DispatchHandle& h, const T* rows_RD, int D, T* received_LD) {
    const int P = ep_.size();
    std::vector<int64_t> send(P), recv(P);
    for (int p = 0; p < P; ++p) send[p] = h.send_rows[p] * D, recv[p] = h.recv_rows[p] * D;
    const auto t0 = Clock::now();
    ep_.all_to_all_v(rows_RD, send.data(), received_LD, recv.data());
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

template void ExpertDispatcher::send_to_experts(const DispatchHandle&, const float*, int, float*);
template void ExpertDispatcher::send_to_experts(const DispatchHandle&, const int32_t*, int, int32_t*);

template <typename T>
void ExpertDispatcher::return_to_senders(const DispatchHandle& h, const T* received_LD, int D, T* rows_RD) {
    const int P = ep_.size();
    std::vector<int64_t> send(P), recv(P);
    for (int p = 0; p < P; ++p) send[p] = h.recv_rows[p] * D, recv[p] = h.send_rows[p] * D;
    const auto t0 = Clock::now();
    ep_.all_to_all_v(received_LD, send.data(), rows_RD, recv.data());
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

template void ExpertDispatcher::return_to_senders(const DispatchHandle&, const float*, int, float*);
template void ExpertDispatcher::return_to_senders(const DispatchHandle&, const int32_t*, int, int32_t*);

}  // namespace bmoe::parallel
