#include "parallel/expert_dispatcher.h"

#include <algorithm>
#include <chrono>

#include "parallel/check.h"

namespace bmoe::parallel {

using Clock = std::chrono::steady_clock;

ExpertDispatcher::ExpertDispatcher(Communicator& ep, int num_experts)
    : ep_(ep), num_experts_(num_experts), num_local_experts_(num_experts / ep.size()) {
    BMOE_REQUIRE(num_experts % ep.size() == 0, "model.num_experts (", num_experts,
                 ") must be divisible by the expert-parallel size (", ep.size(), "): change --parallel.ep");
}

DispatchHandle ExpertDispatcher::dispatch(const float* x_RD,
                                          const std::vector<int>& expert_offsets,
                                          int D,
                                          std::vector<float>& local_x) {
    const int P = ep_.size(), El = num_local_experts_;
    BMOE_ASSERT(static_cast<int>(expert_offsets.size()) == num_experts_ + 1, "expert_offsets size");
    DispatchHandle h;
    h.num_local_experts = El;
    // 1-2. counts: per peer, and per (peer, local expert) so the receiver can regroup
    std::vector<int32_t> expert_rows(num_experts_);
    for (int e = 0; e < num_experts_; ++e) expert_rows[e] = expert_offsets[e + 1] - expert_offsets[e];
    h.send_rows.assign(P, 0);
    for (int p = 0; p < P; ++p) h.send_rows[p] = expert_offsets[(p + 1) * El] - expert_offsets[p * El];
    std::vector<int64_t> per_peer(P, El);
    std::vector<int32_t> recv_expert_rows(static_cast<size_t>(P) * El);
    const auto t0 = Clock::now();
    ep_.all_to_all_v(expert_rows.data(), per_peer.data(), recv_expert_rows.data(), per_peer.data());
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
    h.recv_expert_rows.assign(recv_expert_rows.begin(), recv_expert_rows.end());
    h.recv_rows.assign(P, 0);
    for (int s = 0; s < P; ++s)
        for (int le = 0; le < El; ++le) h.recv_rows[s] += h.recv_expert_rows[static_cast<size_t>(s) * El + le];

    // 4 (planned). received order is (source, local expert); sorted order is (local expert, source)
    h.local_expert_offsets.assign(El + 1, 0);
    for (int le = 0; le < El; ++le) {
        int64_t n = 0;
        for (int s = 0; s < P; ++s) n += h.recv_expert_rows[static_cast<size_t>(s) * El + le];
        h.local_expert_offsets[le + 1] = h.local_expert_offsets[le] + static_cast<int>(n);
    }
    h.received_to_sorted.resize(h.num_local_rows());
    std::vector<int64_t> next(h.local_expert_offsets.begin(), h.local_expert_offsets.end() - 1);
    int64_t r = 0;
    for (int s = 0; s < P; ++s)
        for (int le = 0; le < El; ++le)
            for (int64_t i = 0; i < h.recv_expert_rows[static_cast<size_t>(s) * El + le]; ++i)
                h.received_to_sorted[r++] = static_cast<int32_t>(next[le]++);

    // 3-4. move the rows
    forward(h, x_RD, D, local_x);
    return h;
}

void ExpertDispatcher::forward(const DispatchHandle& h, const float* rows_RD, int D, std::vector<float>& local_rows) {
    const int P = ep_.size();
    std::vector<int64_t> send(P), recv(P);
    for (int p = 0; p < P; ++p) send[p] = h.send_rows[p] * D, recv[p] = h.recv_rows[p] * D;
    staging_.resize(static_cast<size_t>(h.num_local_rows()) * D);
    const auto t0 = Clock::now();
    ep_.all_to_all_v(rows_RD, send.data(), staging_.data(), recv.data());
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
    local_rows.resize(staging_.size());
    for (size_t i = 0; i < h.received_to_sorted.size(); ++i)
        std::copy_n(staging_.data() + i * D, D, local_rows.data() + static_cast<size_t>(h.received_to_sorted[i]) * D);
}

void ExpertDispatcher::combine(const DispatchHandle& h, const float* local_rows, int D, float* y_RD) {
    const int P = ep_.size();
    staging_.resize(static_cast<size_t>(h.num_local_rows()) * D);
    for (size_t i = 0; i < h.received_to_sorted.size(); ++i)
        std::copy_n(local_rows + static_cast<size_t>(h.received_to_sorted[i]) * D, D, staging_.data() + i * D);
    std::vector<int64_t> send(P), recv(P);
    for (int p = 0; p < P; ++p) send[p] = h.recv_rows[p] * D, recv[p] = h.send_rows[p] * D;
    const auto t0 = Clock::now();
    ep_.all_to_all_v(staging_.data(), send.data(), y_RD, recv.data());
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace bmoe::parallel
