#include "model/expert_exchange.h"

#include "parallel/check.h"

namespace bmoe::model {

ExpertExchange::ExpertExchange(
    parallel::Communicator& ep, int num_experts, Backend* backend, bool force_staging, parallel::Communicator* counts)
    : dispatcher_(ep, num_experts, counts),
      backend_(backend),
      staged_(force_staging || (!backend->is_host() && !ep.device_memory())) {
    BMOE_REQUIRE(!(backend->is_host() && ep.device_memory()), "the ", ep.name(),
                 " communicator moves device memory but the backend is ", backend->name(),
                 ": use --train.backend=cuda or --parallel.comm=mpi");
}

const parallel::DispatchHandle& ExpertExchange::plan(const std::vector<int>& expert_offsets) {
    handle_ = dispatcher_.plan(expert_offsets);
    const size_t L = static_cast<size_t>(handle_.num_local_rows());
    received_to_sorted_.ensure(backend_, L);
    sorted_to_received_.ensure(backend_, L);
    received_to_sorted_.upload(handle_.received_to_sorted);
    sorted_to_received_.upload(handle_.sorted_to_received);
    return handle_;
}

const parallel::DispatchHandle& ExpertExchange::dispatch(
    const float* x_RD, const std::vector<int>& expert_offsets, int D, Buffer<float>& local_LD, bool as_bf16) {
    plan(expert_offsets);
    forward(x_RD, D, local_LD, as_bf16);
    return handle_;
}

void ExpertExchange::count_bytes(const std::vector<int64_t>& rows_to_peer, size_t row_bytes) {
    const int me = dispatcher_.communicator().rank();
    for (size_t p = 0; p < rows_to_peer.size(); ++p)
        if (static_cast<int>(p) != me) bytes_sent_ += rows_to_peer[p] * static_cast<int64_t>(row_bytes);
}

template <>
std::vector<float>& ExpertExchange::host_staging<float>(int i) {
    return i == 0 ? host_send_ : host_recv_;
}
template <>
std::vector<int32_t>& ExpertExchange::host_staging<int32_t>(int i) {
    return i == 0 ? host_send_words_ : host_recv_words_;
}

// Words: float rows (W = D), or int32_t words holding two bf16 values (W = D / 2).
template <typename Word>
void ExpertExchange::move(Direction direction, const Word* send, Word* recv, int W) {
    const bool out = direction == Direction::kToExperts;
    const size_t sent = static_cast<size_t>(out ? handle_.num_sent_rows() : handle_.num_local_rows()) * W;
    const size_t received = static_cast<size_t>(out ? handle_.num_local_rows() : handle_.num_sent_rows()) * W;
    auto all_to_all = [&](const Word* from, Word* to) {
        if (out)
            dispatcher_.send_to_experts(handle_, from, W, to);
        else
            dispatcher_.return_to_senders(handle_, from, W, to);
    };
    if (staged_) {  // the communicator reads host memory only
        std::vector<Word>& host_send = host_staging<Word>(0);
        std::vector<Word>& host_recv = host_staging<Word>(1);
        host_send.resize(sent);
        host_recv.resize(received);
        if (sent > 0) backend_->download(host_send.data(), send, sent * sizeof(Word));
        all_to_all(host_send.data(), host_recv.data());
        if (received > 0) backend_->upload(recv, host_recv.data(), received * sizeof(Word));
    } else {
        all_to_all(send, recv);
    }
    count_bytes(out ? handle_.send_rows : handle_.recv_rows, W * sizeof(Word));
}

void ExpertExchange::forward(const float* rows_RD, int D, Buffer<float>& local_LD, bool as_bf16) {
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    local_LD.ensure(backend_, L * D);
    if (as_bf16 && D % 2 == 0) {  // rounded, moved and regrouped in bf16, widened at the end
        rows16_R_.ensure(backend_, R * D);
        local16_.ensure(backend_, L * D);
        if (R > 0) backend_->float_to_bf16(rows16_R_.data(), rows_RD, R * D);
        forward(rows16_R_.data(), D, local16_.data());
        if (L > 0) backend_->bf16_to_float(local_LD.data(), local16_.data(), L * D);
        return;
    }
    received_.ensure(backend_, L * D);
    move(Direction::kToExperts, rows_RD, received_.data(), D);
    // local[sorted] = received[sorted_to_received[sorted]]
    if (L > 0)
        backend_->moe_gather_forward(local_LD.data(), received_.data(), sorted_to_received_.data(), static_cast<int>(L),
                                     1, D);
}

void ExpertExchange::forward(const uint16_t* rows16_RD, int D, uint16_t* local16_LD) {
    BMOE_REQUIRE(D % 2 == 0, "bf16 rows travel as pairs of values in 32-bit words: D must be even, got D = ", D);
    const size_t L = static_cast<size_t>(handle_.num_local_rows());
    rows16_L_.ensure(backend_, L * D);
    move(Direction::kToExperts, reinterpret_cast<const int32_t*>(rows16_RD),
         reinterpret_cast<int32_t*>(rows16_L_.data()), D / 2);
    // local[sorted] = received[sorted_to_received[sorted]]
    if (L > 0)
        backend_->gather_rows_bf16(local16_LD, rows16_L_.data(), sorted_to_received_.data(), static_cast<int>(L), D);
}

void ExpertExchange::combine(const float* local_LD, int D, float* y_RD, bool as_bf16) {
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    // received[r] = local[received_to_sorted[r]], rounded to bf16 on the way where as_bf16
    if (as_bf16 && D % 2 == 0) {
        rows16_L_.ensure(backend_, L * D);
        rows16_R_.ensure(backend_, R * D);
        if (L > 0)
            backend_->moe_gather_forward_bf16(rows16_L_.data(), local_LD, received_to_sorted_.data(),
                                              static_cast<int>(L), 1, D);
        move(Direction::kToSenders, reinterpret_cast<const int32_t*>(rows16_L_.data()),
             reinterpret_cast<int32_t*>(rows16_R_.data()), D / 2);
        if (R > 0) backend_->bf16_to_float(y_RD, rows16_R_.data(), R * D);
        return;
    }
    received_.ensure(backend_, L * D);
    if (L > 0)
        backend_->moe_gather_forward(received_.data(), local_LD, received_to_sorted_.data(), static_cast<int>(L), 1, D);
    move(Direction::kToSenders, received_.data(), y_RD, D);
}

}  // namespace bmoe::model
